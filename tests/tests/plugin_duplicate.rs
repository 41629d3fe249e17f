//! Two registrations with one name are refused at start-up, naming both.

use dtl_core::registry::{AugmentEntry, Registry};
use dtl_core::{Augment, Result};

fn build_a(_: &dtl_core::config::AugmentOp, _: &str) -> Result<Box<dyn Augment>> {
    Err(dtl_core::DtlError::invalid("unused"))
}

mod first {
    dtl_core::inventory::submit! {
        dtl_core::AugmentEntry { name: "zz_twice", description: "one", build: super::build_a, origin: "plugin_one" }
    }
}
mod second {
    dtl_core::inventory::submit! {
        dtl_core::AugmentEntry { name: "zz_twice", description: "two", build: super::build_a, origin: "plugin_two" }
    }
}

#[test]
fn duplicate_names_are_an_error_naming_both() {
    let _unused: Option<&AugmentEntry> = None;
    let e = Registry::gather()
        .err()
        .expect("duplicates are refused")
        .to_string();
    assert!(
        e.contains("duplicate augmentation op registration `zz_twice`"),
        "{e}"
    );
    assert!(e.contains("plugin_one") && e.contains("plugin_two"), "{e}");
    assert!(dtl_core::registry().is_err());
}
