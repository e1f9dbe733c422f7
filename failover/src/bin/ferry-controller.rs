//! `ferry-controller`: see [`ferry_failover::cli`].

fn main() {
    std::process::exit(ferry_failover::cli::main_with_args(
        std::env::args().collect(),
    ));
}
