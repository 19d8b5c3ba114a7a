//! The faces that serve the service layer to callers: the local control
//! socket the CLI uses while a server runs, and the HTTPS API for users and
//! portals; later the web console.

pub mod control_socket;
pub mod http;
