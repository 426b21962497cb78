fn main() {
    std::process::exit(agent_egress::cli::main());
}
