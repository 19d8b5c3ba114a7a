//! The faces that serve the service layer to callers: today the local control
//! socket the CLI uses while a server runs; later the REST API and web console.

pub mod control_socket;
