//! `ferry-gate`: see [`ferry_failover::gate`].

fn main() {
    std::process::exit(ferry_failover::gate::main_with_args(
        std::env::args().collect(),
    ));
}
