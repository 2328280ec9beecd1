//! The `ril-pipe` command line: argument parsing and printing; the work is in the library.
mod cli;

fn main() {
    std::process::exit(cli::main());
}
