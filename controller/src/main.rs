//! `runctl-controller`: see `controller::commands::main`.

fn main() -> std::process::ExitCode {
    controller::commands::main()
}
