//! Fuzz target: verifying arbitrary strings as unsubscribe and bounce tokens never panics and never accepts
//! anything but a token this keyring signed; signing then verifying any payload gives the payload back.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use leadflow_shared::tokens::{Keyring, Purpose};

fn keyring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| {
        match Keyring::parse("f1:fuzz-key-0123456789abcdef0123456789abcdef,f0:old-fuzz-key-0123456789abcdef012345") {
            Ok(ring) => ring,
            Err(e) => panic!("the fuzz keyring does not parse: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let ring = keyring();
    let text = String::from_utf8_lossy(data);
    for purpose in [Purpose::Unsubscribe, Purpose::Bounce] {
        if let Some(payload) = ring.verify(purpose, &text) {
            // Whatever verifies must be exactly what signing that payload produces (no malleability); only tokens
            // of the signing key can be compared that way.
            if text.starts_with("f1.") {
                assert_eq!(
                    ring.sign(purpose, &payload),
                    text,
                    "a token verified that the keyring did not sign"
                );
            }
        }
        let token = ring.sign(purpose, &text);
        assert_eq!(ring.verify(purpose, &token).as_deref(), Some(text.as_ref()));
        let other = match purpose {
            Purpose::Unsubscribe => Purpose::Bounce,
            Purpose::Bounce => Purpose::Unsubscribe,
        };
        assert_eq!(ring.verify(other, &token), None, "a token verified for another purpose");
    }
    let _ = Keyring::parse(&text);
});
