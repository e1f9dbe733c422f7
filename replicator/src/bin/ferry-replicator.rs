//! `ferry-replicator`: see [`ferry_replicator::cli`].

fn main() {
    std::process::exit(ferry_replicator::cli::main_with_args(
        std::env::args().collect(),
    ));
}
