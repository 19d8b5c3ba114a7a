// Each test that includes this module uses a part of it.
#![allow(dead_code)]

//! A minimal VNC viewer for tests: the RFB 3.8 handshake with VNC
//! authentication (DES challenge-response) against a real QEMU display, up
//! to the server's init message, which is when QEMU reports the viewer as
//! attached (libvirt's graphics event "initialize"). Dropping the viewer
//! closes the connection ("disconnect").

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};

const RFB_VERSION: &[u8; 12] = b"RFB 003.008\n";
const SECURITY_VNC_AUTH: u8 = 2;
const TIMEOUT: Duration = Duration::from_secs(10);

/// An attached viewer; the connection closes when it is dropped.
#[derive(Debug)]
pub struct VncViewer {
    stream: TcpStream,
    /// The desktop's name as the server announced it.
    pub desktop_name: String,
}

impl VncViewer {
    /// The viewer's own end of the connection, as the server sees it.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .expect("a connected socket has a local address")
    }
}

/// Why a viewer did not attach.
#[derive(Debug)]
pub enum VncError {
    Io(std::io::Error),
    /// The server refused the password (its reason).
    Refused(String),
    Protocol(String),
}

impl std::fmt::Display for VncError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(error) => write!(formatter, "VNC connection: {error}"),
            Self::Refused(reason) => write!(formatter, "VNC server refused: {reason}"),
            Self::Protocol(problem) => write!(formatter, "VNC protocol: {problem}"),
        }
    }
}

impl std::error::Error for VncError {}

impl From<std::io::Error> for VncError {
    fn from(error: std::io::Error) -> Self {
        Self::Io(error)
    }
}

/// Connects to `address` and authenticates with `password` (VNC counts
/// only its first 8 bytes).
pub fn attach(address: SocketAddr, password: &str) -> Result<VncViewer, VncError> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;

    let mut version = [0u8; 12];
    stream.read_exact(&mut version)?;
    if !version.starts_with(b"RFB 003.") {
        return Err(VncError::Protocol(format!(
            "not an RFB server: {version:?}"
        )));
    }
    stream.write_all(RFB_VERSION)?;

    let count = read_u8(&mut stream)?;
    if count == 0 {
        return Err(VncError::Refused(read_reason(&mut stream)?));
    }
    let mut types = vec![0u8; usize::from(count)];
    stream.read_exact(&mut types)?;
    if !types.contains(&SECURITY_VNC_AUTH) {
        return Err(VncError::Protocol(format!(
            "the server offers no VNC authentication: {types:?}"
        )));
    }
    stream.write_all(&[SECURITY_VNC_AUTH])?;

    let mut challenge = [0u8; 16];
    stream.read_exact(&mut challenge)?;
    stream.write_all(&vnc_auth_response(password, challenge))?;
    let mut result = [0u8; 4];
    stream.read_exact(&mut result)?;
    if u32::from_be_bytes(result) != 0 {
        return Err(VncError::Refused(read_reason(&mut stream)?));
    }

    // ClientInit (share the desktop), then ServerInit: width, height,
    // pixel format (16 bytes), name.
    stream.write_all(&[1])?;
    let mut init = [0u8; 20];
    stream.read_exact(&mut init)?;
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > 4096 {
        return Err(VncError::Protocol(format!(
            "desktop name of {length} bytes"
        )));
    }
    let mut name = vec![0u8; length];
    stream.read_exact(&mut name)?;
    Ok(VncViewer {
        stream,
        desktop_name: String::from_utf8_lossy(&name).into_owned(),
    })
}

/// The challenge encrypted with DES under the password, whose bytes VNC
/// uses bit-reversed as the key.
fn vnc_auth_response(password: &str, challenge: [u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (slot, byte) in key.iter_mut().zip(password.bytes()) {
        *slot = byte.reverse_bits();
    }
    let cipher = des::Des::new_from_slice(&key).expect("a DES key is 8 bytes");
    let mut response = challenge;
    for block in response.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    response
}

fn read_u8(stream: &mut TcpStream) -> Result<u8, VncError> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(byte[0])
}

fn read_reason(stream: &mut TcpStream) -> Result<String, VncError> {
    let mut length = [0u8; 4];
    if stream.read_exact(&mut length).is_err() {
        return Ok("no reason given".to_owned());
    }
    let length = (u32::from_be_bytes(length) as usize).min(4096);
    let mut reason = vec![0u8; length];
    stream.read_exact(&mut reason)?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}
