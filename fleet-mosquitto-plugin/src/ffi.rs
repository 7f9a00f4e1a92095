//! Mosquitto's plugin interface (version 5, Mosquitto 2.0): the entry
//! points it calls, the broker functions it exports, and the event data it
//! passes, declared as in `mosquitto_broker.h` and `mosquitto_plugin.h`.
//!
//! Every callback catches panics (none should happen: a panic would
//! otherwise abort the broker) and answers "refused" when in doubt.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Config, Gate, Presented};

const MOSQ_EVT_BASIC_AUTH: c_int = 3;
const MOSQ_EVT_MESSAGE: c_int = 7;
const MOSQ_EVT_TICK: c_int = 9;
const MOSQ_EVT_DISCONNECT: c_int = 10;

const MOSQ_ERR_SUCCESS: c_int = 0;
const MOSQ_ERR_INVAL: c_int = 3;
const MOSQ_ERR_AUTH: c_int = 11;
const MOSQ_ERR_ACL_DENIED: c_int = 12;
const MOSQ_ERR_UNKNOWN: c_int = 13;

const MOSQ_LOG_NOTICE: c_int = 0x02;
const MOSQ_LOG_WARNING: c_int = 0x04;
const MOSQ_LOG_ERR: c_int = 0x08;

const MQTT_PROP_RESPONSE_TOPIC: c_int = 8;

/// `struct mosquitto` (opaque).
#[repr(C)]
struct Client {
    _private: [u8; 0],
}

/// `mosquitto_property` (opaque).
#[repr(C)]
struct Property {
    _private: [u8; 0],
}

/// `mosquitto_plugin_id_t` (opaque).
#[repr(C)]
struct PluginId {
    _private: [u8; 0],
}

// Mirrors the C layout; some fields are never read.
#[allow(dead_code)]
#[repr(C)]
struct Opt {
    key: *const c_char,
    value: *const c_char,
}

// Mirrors the C layout; some fields are never read.
#[allow(dead_code)]
#[repr(C)]
struct EvtBasicAuth {
    future: *mut c_void,
    client: *mut Client,
    username: *mut c_char,
    password: *mut c_char,
    future2: [*mut c_void; 4],
}

// Mirrors the C layout; some fields are never read.
#[allow(dead_code)]
#[repr(C)]
struct EvtMessage {
    future: *mut c_void,
    client: *mut Client,
    topic: *mut c_char,
    payload: *mut c_void,
    properties: *mut Property,
    reason_string: *mut c_char,
    payloadlen: u32,
    qos: u8,
    reason_code: u8,
    retain: bool,
    future2: [*mut c_void; 4],
}

// Mirrors the C layout; some fields are never read.
#[allow(dead_code)]
#[repr(C)]
struct EvtDisconnect {
    future: *mut c_void,
    client: *mut Client,
    reason: c_int,
    future2: [*mut c_void; 4],
}

type Callback = unsafe extern "C" fn(c_int, *mut c_void, *mut c_void) -> c_int;

// Exported by the broker (resolved when Mosquitto loads the plugin), and by
// the OpenSSL it links.
unsafe extern "C" {
    fn mosquitto_callback_register(
        id: *mut PluginId,
        event: c_int,
        cb: Callback,
        event_data: *const c_void,
        userdata: *mut c_void,
    ) -> c_int;
    fn mosquitto_callback_unregister(
        id: *mut PluginId,
        event: c_int,
        cb: Callback,
        event_data: *const c_void,
    ) -> c_int;
    fn mosquitto_client_id(client: *const Client) -> *const c_char;
    fn mosquitto_client_certificate(client: *const Client) -> *mut c_void;
    fn mosquitto_set_username(client: *mut Client, username: *const c_char) -> c_int;
    fn mosquitto_kick_client_by_clientid(client_id: *const c_char, with_will: bool) -> c_int;
    fn mosquitto_property_read_string(
        proplist: *const Property,
        identifier: c_int,
        value: *mut *mut c_char,
        skip_first: bool,
    ) -> *const Property;
    fn mosquitto_free(mem: *mut c_void);
    fn mosquitto_log_printf(level: c_int, fmt: *const c_char, ...);
    fn i2d_X509(x: *mut c_void, out: *mut *mut u8) -> c_int;
    fn X509_free(x: *mut c_void);
    fn CRYPTO_free(p: *mut c_void, file: *const c_char, line: c_int);
}

/// The plugin's one gate (Mosquitto runs its callbacks on one thread; the
/// lock is for soundness, not contention).
static GATE: Mutex<Option<Gate>> = Mutex::new(None);
/// The plugin id Mosquitto gave, to unregister with.
static PLUGIN_ID: Mutex<usize> = Mutex::new(0);
/// When the roster was last looked at from the tick.
static LAST_LOOK: Mutex<Option<Instant>> = Mutex::new(None);

fn gate() -> MutexGuard<'static, Option<Gate>> {
    GATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn log(level: c_int, message: &str) {
    let text =
        CString::new(format!("fleet plugin: {message}").replace('\0', " ")).unwrap_or_default();
    // SAFETY: a "%s" format with one NUL-terminated string argument.
    unsafe { mosquitto_log_printf(level, c"%s".as_ptr(), text.as_ptr()) };
}

/// Runs a callback, turning a panic into `on_panic`.
fn guarded(on_panic: c_int, f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        log(MOSQ_LOG_ERR, "internal error (refused)");
        on_panic
    })
}

/// The client's id, if it has one.
///
/// # Safety
/// `client` is a live client Mosquitto passed.
unsafe fn client_id(client: *const Client) -> Option<String> {
    // SAFETY: the caller's; Mosquitto returns NULL or a NUL-terminated string.
    let p = unsafe { mosquitto_client_id(client) };
    // SAFETY: non-NULL, NUL-terminated, alive for the call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The client's certificate, DER.
///
/// # Safety
/// `client` is a live client Mosquitto passed.
unsafe fn certificate_der(client: *const Client) -> Option<Vec<u8>> {
    // SAFETY: the caller's; the X509 returned is ours to free.
    let x509 = unsafe { mosquitto_client_certificate(client) };
    if x509.is_null() {
        return None;
    }
    let mut out: *mut u8 = std::ptr::null_mut();
    // SAFETY: `x509` is a valid X509; with *out NULL, OpenSSL allocates.
    let len = unsafe { i2d_X509(x509, &mut out) };
    let der = (len > 0 && !out.is_null()).then(|| {
        // SAFETY: OpenSSL wrote `len` bytes at `out`.
        unsafe { std::slice::from_raw_parts(out, len as usize) }.to_vec()
    });
    // SAFETY: freeing what OpenSSL allocated, and the X509 we were given.
    unsafe {
        if !out.is_null() {
            CRYPTO_free(out.cast(), c"fleet-mosquitto-plugin".as_ptr(), 0);
        }
        X509_free(x509);
    }
    der
}

unsafe extern "C" fn on_basic_auth(_event: c_int, data: *mut c_void, _user: *mut c_void) -> c_int {
    guarded(MOSQ_ERR_AUTH, || {
        // SAFETY: Mosquitto passes its basic-auth event data.
        let ed = unsafe { &*(data as *const EvtBasicAuth) };
        let conn = ed.client as usize;
        // SAFETY: the client of the event.
        let Some(id) = (unsafe { client_id(ed.client) }) else {
            return MOSQ_ERR_AUTH;
        };
        // SAFETY: the client of the event.
        let Some(der) = (unsafe { certificate_der(ed.client) }) else {
            log(
                MOSQ_LOG_NOTICE,
                &format!("{id} refused: no client certificate (require_certificate true)"),
            );
            return MOSQ_ERR_AUTH;
        };
        let Ok(cert) = Presented::from_der(&der) else {
            log(
                MOSQ_LOG_NOTICE,
                &format!("{id} refused: unreadable certificate"),
            );
            return MOSQ_ERR_AUTH;
        };
        let mut guard = gate();
        let Some(g) = guard.as_mut() else {
            return MOSQ_ERR_AUTH;
        };
        if let Err(e) = g.refresh() {
            log(MOSQ_LOG_ERR, &e);
        }
        match g.admit(conn, &cert, &id) {
            Ok(_role) => {
                drop(guard);
                let Ok(name) = CString::new(cert.common_name.as_str()) else {
                    return MOSQ_ERR_AUTH;
                };
                // The user name the ACL's `%u` and `user` lines match.
                // SAFETY: a live client and a NUL-terminated name.
                if unsafe { mosquitto_set_username(ed.client, name.as_ptr()) } != MOSQ_ERR_SUCCESS {
                    if let Some(g) = gate().as_mut() {
                        g.disconnected(conn, &id);
                    }
                    return MOSQ_ERR_AUTH;
                }
                MOSQ_ERR_SUCCESS
            }
            Err(refusal) => {
                log(
                    MOSQ_LOG_NOTICE,
                    &format!("{} ({id}) refused: {refusal}", cert.common_name),
                );
                MOSQ_ERR_AUTH
            }
        }
    })
}

unsafe extern "C" fn on_message(_event: c_int, data: *mut c_void, _user: *mut c_void) -> c_int {
    guarded(MOSQ_ERR_ACL_DENIED, || {
        // SAFETY: Mosquitto passes its message event data.
        let ed = unsafe { &*(data as *const EvtMessage) };
        // SAFETY: the client of the event.
        let Some(id) = (unsafe { client_id(ed.client) }) else {
            return MOSQ_ERR_ACL_DENIED;
        };
        if ed.topic.is_null() {
            return MOSQ_ERR_ACL_DENIED;
        }
        // SAFETY: a NUL-terminated topic, alive for the call.
        let topic = unsafe { CStr::from_ptr(ed.topic) }.to_string_lossy();
        let mut response: *mut c_char = std::ptr::null_mut();
        if !ed.properties.is_null() {
            // SAFETY: the message's property list; `response` is set to a
            // copy we free.
            unsafe {
                mosquitto_property_read_string(
                    ed.properties,
                    MQTT_PROP_RESPONSE_TOPIC,
                    &mut response,
                    false,
                );
            }
        }
        let response_topic = (!response.is_null())
            // SAFETY: a NUL-terminated copy.
            .then(|| {
                unsafe { CStr::from_ptr(response) }
                    .to_string_lossy()
                    .into_owned()
            });
        if !response.is_null() {
            // SAFETY: allocated by mosquitto_property_read_string.
            unsafe { mosquitto_free(response.cast()) };
        }
        let allowed = gate()
            .as_ref()
            .is_some_and(|g| g.may_publish(&id, &topic, ed.retain, response_topic.as_deref()));
        if allowed {
            MOSQ_ERR_SUCCESS
        } else {
            log(
                MOSQ_LOG_NOTICE,
                &format!(
                    "{id}: PUBLISH to {topic} refused (retained request, or a response topic outside $prefix/clients/{id}/)"
                ),
            );
            MOSQ_ERR_ACL_DENIED
        }
    })
}

unsafe extern "C" fn on_disconnect(_event: c_int, data: *mut c_void, _user: *mut c_void) -> c_int {
    guarded(MOSQ_ERR_SUCCESS, || {
        // SAFETY: Mosquitto passes its disconnect event data.
        let ed = unsafe { &*(data as *const EvtDisconnect) };
        // SAFETY: the client of the event.
        if let Some(id) = unsafe { client_id(ed.client) }
            && let Some(g) = gate().as_mut()
        {
            g.disconnected(ed.client as usize, &id);
        }
        MOSQ_ERR_SUCCESS
    })
}

unsafe extern "C" fn on_tick(_event: c_int, _data: *mut c_void, _user: *mut c_void) -> c_int {
    guarded(MOSQ_ERR_SUCCESS, || {
        {
            let mut last = LAST_LOOK.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return MOSQ_ERR_SUCCESS;
            }
            *last = Some(Instant::now());
        }
        let kick = {
            let mut guard = gate();
            let Some(g) = guard.as_mut() else {
                return MOSQ_ERR_SUCCESS;
            };
            match g.refresh() {
                Ok(true) => g.no_longer_admitted(),
                Ok(false) => Vec::new(),
                Err(e) => {
                    log(MOSQ_LOG_ERR, &e);
                    g.no_longer_admitted()
                }
            }
        };
        // Outside the lock: kicking calls back into on_disconnect.
        for id in kick {
            log(
                MOSQ_LOG_NOTICE,
                &format!("{id} disconnected: the registry no longer admits it"),
            );
            if let Ok(c) = CString::new(id) {
                // SAFETY: a NUL-terminated client id.
                unsafe { mosquitto_kick_client_by_clientid(c.as_ptr(), false) };
            }
        }
        MOSQ_ERR_SUCCESS
    })
}

const EVENTS: [(c_int, Callback); 4] = [
    (MOSQ_EVT_BASIC_AUTH, on_basic_auth),
    (MOSQ_EVT_MESSAGE, on_message),
    (MOSQ_EVT_DISCONNECT, on_disconnect),
    (MOSQ_EVT_TICK, on_tick),
];

/// Mosquitto asks which plugin interface versions this plugin speaks: 5.
///
/// # Safety
/// `versions` points at `count` integers (Mosquitto's).
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn mosquitto_plugin_version(
    count: c_int,
    versions: *const c_int,
) -> c_int {
    if versions.is_null() || count <= 0 {
        return -1;
    }
    // SAFETY: the caller's.
    let versions = unsafe { std::slice::from_raw_parts(versions, count as usize) };
    if versions.contains(&5) { 5 } else { -1 }
}

/// Mosquitto starts the plugin with its `plugin_opt_*` options.
///
/// # Safety
/// The arguments are Mosquitto's: `options` points at `count` options.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn mosquitto_plugin_init(
    id: *mut c_void,
    _userdata: *mut *mut c_void,
    options: *const c_void,
    count: c_int,
) -> c_int {
    guarded(MOSQ_ERR_UNKNOWN, || {
        let options: &[Opt] = if options.is_null() || count <= 0 {
            &[]
        } else {
            // SAFETY: the caller's.
            unsafe { std::slice::from_raw_parts(options.cast::<Opt>(), count as usize) }
        };
        let mut pairs = Vec::new();
        for o in options {
            if o.key.is_null() || o.value.is_null() {
                continue;
            }
            // SAFETY: NUL-terminated strings of the configuration.
            let (k, v) = unsafe { (CStr::from_ptr(o.key), CStr::from_ptr(o.value)) };
            pairs.push((
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            ));
        }
        let config = match Config::from_options(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            Ok(c) => c,
            Err(e) => {
                log(MOSQ_LOG_ERR, &e.to_string());
                return MOSQ_ERR_INVAL;
            }
        };
        let mut g = Gate::new(config);
        if let Err(e) = g.refresh() {
            log(MOSQ_LOG_WARNING, &e);
        }
        log(
            MOSQ_LOG_NOTICE,
            &format!(
                "admitting by the roster {} (backends {:?}, claimants {:?})",
                g.config().roster.display(),
                g.config().backend_identities,
                g.config().claim_identities
            ),
        );
        *gate() = Some(g);
        *PLUGIN_ID.lock().unwrap_or_else(|p| p.into_inner()) = id as usize;
        let id = id.cast::<PluginId>();
        for (event, cb) in EVENTS {
            // SAFETY: registering our callbacks under Mosquitto's id.
            let rc = unsafe {
                mosquitto_callback_register(id, event, cb, std::ptr::null(), std::ptr::null_mut())
            };
            if rc != MOSQ_ERR_SUCCESS {
                log(
                    MOSQ_LOG_ERR,
                    &format!("cannot register for event {event}: error {rc}"),
                );
                return rc;
            }
        }
        MOSQ_ERR_SUCCESS
    })
}

/// Mosquitto stops the plugin.
///
/// # Safety
/// Called by Mosquitto once, after [`mosquitto_plugin_init`].
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn mosquitto_plugin_cleanup(
    _userdata: *mut c_void,
    _options: *const c_void,
    _count: c_int,
) -> c_int {
    guarded(MOSQ_ERR_SUCCESS, || {
        let id = *PLUGIN_ID.lock().unwrap_or_else(|p| p.into_inner());
        if id != 0 {
            for (event, cb) in EVENTS {
                // SAFETY: unregistering what init registered.
                unsafe {
                    mosquitto_callback_unregister(id as *mut PluginId, event, cb, std::ptr::null())
                };
            }
        }
        *gate() = None;
        MOSQ_ERR_SUCCESS
    })
}
