//! Which events an endpoint receives: its `events` (types) and `tenants`
//! lists, each empty for "all". Pure.
//!
//! Trust boundary: the lists come from the validated config; events are
//! our own.

use crate::events::{Event, EventKind};

#[derive(Debug, Clone, Default)]
pub struct Filter {
    kinds: Vec<EventKind>,
    tenants: Vec<String>,
}

/// An event type by its name in the events log (`"bounced"`, `"dsn_queued"`);
/// the error lists the valid names.
pub fn kind(name: &str) -> Result<EventKind, String> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|e| e.to_string())
}

impl Filter {
    pub fn new(kinds: Vec<EventKind>, tenants: Vec<String>) -> Filter {
        Filter { kinds, tenants }
    }

    /// With a tenant list, events without a tenant (breakers of a sender
    /// domain, `delivery_paused`) are not sent.
    pub fn matches(&self, ev: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&ev.event))
            && (self.tenants.is_empty() || ev.tenant.as_ref().is_some_and(|t| self.tenants.contains(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, tenant: Option<&str>) -> Event {
        let mut e = Event::new(kind);
        e.tenant = tenant.map(str::to_string);
        e
    }

    #[test]
    fn names() {
        assert_eq!(kind("bounced").unwrap(), EventKind::Bounced);
        assert_eq!(kind("dsn_queued").unwrap(), EventKind::DsnQueued);
        assert_eq!(kind("guard_warning").unwrap(), EventKind::GuardWarning);
        let e = kind("bounce").unwrap_err();
        assert!(e.contains("bounced") && e.contains("complaint"), "{e}");
        assert!(kind("Bounced").is_err());
    }

    #[test]
    fn matches() {
        use EventKind::*;
        let all = Filter::default();
        let kinds = Filter::new(vec![Bounced, Complaint], vec![]);
        let tenants = Filter::new(vec![], vec!["acme".into()]);
        let both = Filter::new(vec![Delivered], vec!["acme".into(), "beta".into()]);
        let table: &[(&Filter, Event, bool)] = &[
            (&all, ev(Received, None), true),
            (&all, ev(Bounced, Some("x")), true),
            (&kinds, ev(Bounced, None), true),
            (&kinds, ev(Complaint, Some("acme")), true),
            (&kinds, ev(Delivered, Some("acme")), false),
            (&tenants, ev(Delivered, Some("acme")), true),
            (&tenants, ev(Delivered, Some("beta")), false),
            (&tenants, ev(DeliveryPaused, None), false),
            (&both, ev(Delivered, Some("beta")), true),
            (&both, ev(Bounced, Some("beta")), false),
            (&both, ev(Delivered, Some("gamma")), false),
        ];
        for (i, (f, e, want)) in table.iter().enumerate() {
            assert_eq!(f.matches(e), *want, "row {i}");
        }
    }
}
