//! Viewer connects and disconnects, from libvirt's domain graphics events.
//!
//! The `virt` crate has no domain events, so this file reaches them through
//! `virt::sys` (DESIGN.md section 10): the only `unsafe` code of the
//! actuator besides the stream wrapper, kept to five FFI calls.
//!
//! # How it works
//!
//! - libvirt delivers events from an event loop the application runs: the
//!   first watch registers libvirt's default loop
//!   (`virEventRegisterDefaultImpl`) and starts one thread that runs it for
//!   the life of the process.
//! - Each watch opens its **own connection** after that (a connection opened
//!   before the loop was registered never delivers events), turns on
//!   keepalive so a dead libvirtd is noticed (~15 s), and registers one
//!   graphics callback. The callback turns libvirt's arguments into a
//!   [`DisplayEvent`] for deskgrid's domains (others are ignored) and hands
//!   it to the sink; it never unwinds into C.
//! - Dropping the watch deregisters the callback and closes the connection;
//!   libvirt then frees the boxed sink through the free callback.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;
use std::time::Duration;

use virt::connect::Connect;
use virt::sys;

use crate::actuator::hypervisor::{
    ActuatorError, DisplayEvent, DisplayPhase, DisplaySink, DisplayWatch,
};
use crate::actuator::naming::parse_domain_name;

/// Keepalive probes: every 5 s, connection declared dead after 3 missed.
const KEEPALIVE_INTERVAL_S: c_int = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// Registers libvirt's default event loop once and runs it on a thread of
/// its own. Every later call returns the first call's outcome.
fn ensure_event_loop() -> Result<(), ActuatorError> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        #[allow(unsafe_code)]
        // SAFETY: takes no arguments; called once per process (OnceLock).
        let registered = unsafe { sys::virEventRegisterDefaultImpl() };
        if registered < 0 {
            return Err(last_error());
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                #[allow(unsafe_code)]
                // SAFETY: the default implementation is registered above.
                let ran = unsafe { sys::virEventRunDefaultImpl() };
                if ran < 0 {
                    tracing::warn!(error = %last_error(), "libvirt event loop iteration failed");
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .map(|_| ())
            .map_err(|error| format!("cannot start the libvirt event thread: {error}"))
    })
    .clone()
    .map_err(|message| ActuatorError::Libvirt {
        operation: "register the event loop",
        message,
    })
}

fn last_error() -> String {
    virt::error::Error::last_error().message().to_owned()
}

/// A graphics-event subscription on a connection of its own.
pub(crate) struct LibvirtDisplayWatch {
    connection: Connect,
    callback_id: c_int,
}

impl std::fmt::Debug for LibvirtDisplayWatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LibvirtDisplayWatch")
            .field("callback_id", &self.callback_id)
            .finish()
    }
}

impl LibvirtDisplayWatch {
    /// Opens a connection to `uri` and subscribes `sink` to the graphics
    /// events of every domain on it.
    pub(crate) fn start(uri: &str, sink: DisplaySink) -> Result<Self, ActuatorError> {
        ensure_event_loop()?;
        let mut connection = Connect::open(Some(uri)).map_err(|error| ActuatorError::Connect {
            uri: uri.to_owned(),
            message: error.message().to_owned(),
        })?;
        if let Err(error) = connection.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            // Events still arrive; only a dead daemon goes unnoticed longer.
            tracing::debug!(error = %error.message(), "libvirt keepalive not enabled on the event connection");
        }
        let opaque = Box::into_raw(Box::new(sink)).cast::<c_void>();
        type GraphicsCallback = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            c_int,
            *const sys::virDomainEventGraphicsAddress,
            *const sys::virDomainEventGraphicsAddress,
            *const c_char,
            *const sys::virDomainEventGraphicsSubject,
            *mut c_void,
        );
        type GenericCallback =
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
        let graphics: GraphicsCallback = on_graphics;
        #[allow(unsafe_code)]
        // SAFETY: libvirt calls a callback registered for
        // VIR_DOMAIN_EVENT_ID_GRAPHICS with the graphics signature; the
        // generic type is only how the C API passes it (its
        // VIR_DOMAIN_EVENT_CALLBACK macro is this cast).
        let generic: GenericCallback =
            unsafe { std::mem::transmute::<GraphicsCallback, GenericCallback>(graphics) };
        #[allow(unsafe_code)]
        // SAFETY: the connection is open; `opaque` is a leaked
        // `Box<DisplaySink>` that libvirt hands back to `on_graphics` and
        // frees exactly once through `free_sink`.
        let callback_id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                connection.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_GRAPHICS as c_int,
                Some(generic),
                opaque,
                Some(free_sink),
            )
        };
        if callback_id < 0 {
            let message = last_error();
            #[allow(unsafe_code)]
            // SAFETY: registration failed, so libvirt did not take `opaque`.
            drop(unsafe { Box::from_raw(opaque.cast::<DisplaySink>()) });
            let _ = connection.close();
            return Err(ActuatorError::Libvirt {
                operation: "subscribe to graphics events",
                message,
            });
        }
        tracing::info!(%uri, "watching desktop displays for viewer connects and disconnects");
        Ok(Self {
            connection,
            callback_id,
        })
    }
}

impl DisplayWatch for LibvirtDisplayWatch {
    fn is_alive(&self) -> bool {
        self.connection.is_alive().unwrap_or(false)
    }
}

impl Drop for LibvirtDisplayWatch {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: the id came from a successful registration on this
        // connection, which is still open.
        let deregistered = unsafe {
            sys::virConnectDomainEventDeregisterAny(self.connection.as_ptr(), self.callback_id)
        };
        if deregistered < 0 {
            tracing::debug!(error = %last_error(), "deregistering the graphics callback");
        }
        if let Err(error) = self.connection.close() {
            tracing::debug!(error = %error.message(), "closing the event connection");
        }
    }
}

/// Frees the sink when libvirt lets go of the callback.
#[allow(unsafe_code)]
unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        #[allow(unsafe_code)]
        // SAFETY: `opaque` is the `Box<DisplaySink>` leaked at registration;
        // libvirt calls this once.
        drop(unsafe { Box::from_raw(opaque.cast::<DisplaySink>()) });
    }
}

/// libvirt's graphics callback. Must not unwind into C.
#[allow(clippy::too_many_arguments, unsafe_code)]
unsafe extern "C" fn on_graphics(
    _connection: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    phase: c_int,
    _local: *const sys::virDomainEventGraphicsAddress,
    remote: *const sys::virDomainEventGraphicsAddress,
    _auth_scheme: *const c_char,
    _subject: *const sys::virDomainEventGraphicsSubject,
    opaque: *mut c_void,
) {
    if opaque.is_null() || domain.is_null() {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: libvirt passes the pointers valid for the call; the name is
    // owned by the domain object, `remote`'s strings by the event.
    let (name, client) = unsafe {
        let name = sys::virDomainGetName(domain);
        let name = (!name.is_null()).then(|| c_text(name));
        let client = if remote.is_null() {
            String::new()
        } else {
            let remote = &*remote;
            format!("{}:{}", c_text(remote.node), c_text(remote.service))
        };
        (name, client)
    };
    #[allow(unsafe_code)]
    // SAFETY: see `start`: `opaque` is the live `Box<DisplaySink>`.
    let sink = unsafe { &*opaque.cast::<DisplaySink>() };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(vm) = name.as_deref().and_then(parse_domain_name) else {
            return;
        };
        let phase = match phase as u32 {
            sys::VIR_DOMAIN_EVENT_GRAPHICS_CONNECT => DisplayPhase::Connected,
            sys::VIR_DOMAIN_EVENT_GRAPHICS_INITIALIZE => DisplayPhase::Authenticated,
            sys::VIR_DOMAIN_EVENT_GRAPHICS_DISCONNECT => DisplayPhase::Disconnected,
            _ => return,
        };
        sink(DisplayEvent { vm, phase, client });
    }));
    if outcome.is_err() {
        tracing::error!("a display event handler panicked; the event is lost");
    }
}

/// A C string libvirt handed over, as text (lossy; empty for null).
///
/// # Safety
/// `text` is null or points to a NUL-terminated string valid for the call.
#[allow(unsafe_code)]
unsafe fn c_text(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    #[allow(unsafe_code)]
    // SAFETY: see the function's contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}
