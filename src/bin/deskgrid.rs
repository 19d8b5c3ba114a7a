//! The `deskgrid` binary: the appliance daemon (`deskgrid serve`) and the CLI.

fn main() -> std::process::ExitCode {
    deskgrid::cli::main()
}
