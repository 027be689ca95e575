pub fn x(){}
pub mod sites;
