//! `sqlite-writer`: the lab's demo workload (`run`), and its checks on a data copy (`verify`, `last`).

fn main() -> std::process::ExitCode {
    ferry_sqlite_writer::cli::main_with_args(std::env::args_os())
}
