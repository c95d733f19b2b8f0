//! The Neuron stand-in worker as its own program (the `inferd
//! neuron-standin` subcommand runs the same code); see
//! `inferd_exec::neuron::standin`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(inferd_exec::neuron::standin::main_with_args(&args));
}
