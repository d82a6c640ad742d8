mod runner;

fn main() {}
