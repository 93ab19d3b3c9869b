//! The forward proxy's CONNECT request-target parser: whatever bytes a local process sends, it
//! never panics, and what it accepts is a DNS name (never an IP literal or a name for this
//! machine) on an allowed port, already in the form keygate compares.
#![no_main]

use keygate::proxy::connect::{allowed, authority, host_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let ports = [443u16, 8443];
    if let Ok(t) = authority(raw, &ports) {
        assert!(ports.contains(&t.port));
        assert!(t.host.parse::<std::net::IpAddr>().is_err(), "{raw:?}");
        assert!(!t.host.contains(':') && !t.host.ends_with('.'), "{raw:?}");
        assert_eq!(t.host, t.host.to_ascii_lowercase());
        assert_ne!(t.host, "localhost");
        // The accepted form is a fixed point: config load and the listener agree on it.
        assert_eq!(host_name(&t.host).as_deref(), Ok(t.host.as_str()));
        let list = vec![format!("*.{}", t.host), t.host.clone()];
        assert!(allowed(&list, &t.host));
        assert!(!allowed(&list[..1], &t.host), "a wildcard never matches its own suffix");
    }
});
