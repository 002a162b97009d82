//! Parsing inbound reports: the RFC 3464 examples, bounces as Postfix, Exim, Exchange and Gmail write them, an RFC
//! 5965 abuse report, a mailto unsubscribe, and damaged input that must be refused without a panic.

use std::path::PathBuf;

use leadflow_shared::dsn::{parse_report, Action, Class, ParseError, Report, ReportKind};

/// The VERP token the samples carry (payload "42", not a valid MAC: parsing does not verify).
const TOKEN: &str = "t1.NDI.AAAAAAAAAAAAAAAAAAAAAA";
/// The unsubscribe token in the samples' List-Unsubscribe and mailto subject (payload "d:42").
const UNSUBSCRIBE: &str = "t1.ZDo0Mg.BBBBBBBBBBBBBBBBBBBBBB";
const LEAD: &str = "ann.lee@example.net";

fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("dsn")
}

fn sample(name: &str) -> Vec<u8> {
    let path = samples_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn parsed(name: &str) -> Report {
    parse_report(&sample(name)).unwrap_or_else(|e| panic!("{name} did not parse: {e}"))
}

/// The class of the one block about the lead.
fn lead_class(report: &Report) -> Class {
    let blocks = report.recipients_for(LEAD);
    assert_eq!(blocks.len(), 1, "expected one block about the lead in {report:#?}");
    blocks[0].class()
}

#[test]
fn the_rfc_3464_simple_failure_is_a_failed_transient_status() {
    let r = parsed("rfc3464-simple-failure.msg");
    assert_eq!(r.kind, ReportKind::Dsn);
    assert!(!r.heuristic);
    assert_eq!(r.reporting_mta.as_deref(), Some("cs.utk.edu"));
    assert_eq!(r.recipients.len(), 1);
    let block = &r.recipients[0];
    assert_eq!(block.final_recipient.as_deref(), Some("louisl@larry.slip.umd.edu"));
    assert_eq!(block.original_recipient.as_deref(), Some("louisl@larry.slip.umd.edu"));
    assert_eq!(block.action, Action::Failed);
    assert_eq!(block.status.as_deref(), Some("4.0.0"));
    assert_eq!(block.diagnostic.as_deref(), Some("426 connection timed out"));
    // Given up after days of 4xx: counted toward the soft rule, not a hard bounce.
    assert_eq!(block.class(), Class::Soft);
    assert!(
        r.bounce_tokens().is_empty(),
        "an address without a VERP token carries none"
    );
}

#[test]
fn the_rfc_3464_multi_recipient_report_keeps_each_block() {
    let r = parsed("rfc3464-multi-recipient.msg");
    let summary: Vec<(String, Action, Option<String>, Class)> = r
        .recipients
        .iter()
        .map(|b| {
            (
                b.final_recipient.clone().unwrap_or_default(),
                b.action,
                b.status.clone(),
                b.class(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "arathib@vnet.ibm.com".into(),
                Action::Failed,
                Some("5.0.0".into()),
                Class::Soft
            ),
            (
                "johnh@hpnjld.njd.hp.com".into(),
                Action::Delayed,
                Some("4.0.0".into()),
                Class::Ignore
            ),
            (
                "wsnell@sdcc13.ucsd.edu".into(),
                Action::Failed,
                Some("5.0.0".into()),
                Class::Hard
            ),
        ]
    );
    // The folded diagnostic is unfolded.
    assert_eq!(
        r.recipients[0].diagnostic.as_deref(),
        Some("550 'arathib@vnet.IBM.COM' is not a registered gateway user")
    );
    assert_eq!(r.recipients_for("WSNELL@sdcc13.ucsd.edu").len(), 1);
}

#[test]
fn recipient_blocks_without_blank_lines_between_them_are_still_separated() {
    let raw = String::from_utf8(sample("rfc3464-multi-recipient.msg")).unwrap();
    let squashed = raw.replace("\n\nOriginal-Recipient", "\nOriginal-Recipient");
    let r = parse_report(squashed.as_bytes()).unwrap();
    let finals: Vec<&str> = r
        .recipients
        .iter()
        .filter_map(|b| b.final_recipient.as_deref())
        .collect();
    assert_eq!(
        finals,
        [
            "arathib@vnet.ibm.com",
            "johnh@hpnjld.njd.hp.com",
            "wsnell@sdcc13.ucsd.edu"
        ]
    );
    assert_eq!(r.recipients[1].action, Action::Delayed);
}

#[test]
fn the_rfc_3464_delayed_report_changes_nothing() {
    let r = parsed("rfc3464-delayed.msg");
    assert_eq!(r.recipients.len(), 1);
    assert_eq!(r.recipients[0].action, Action::Delayed);
    assert_eq!(r.recipients[0].class(), Class::Ignore);
}

#[test]
fn a_postfix_bounce_names_the_delivery_through_its_verp_address() {
    let r = parsed("postfix-user-unknown.msg");
    assert_eq!(r.kind, ReportKind::Dsn);
    assert_eq!(r.reporting_mta.as_deref(), Some("mail.shop.example"));
    assert_eq!(
        r.envelope_sender.as_deref(),
        Some(format!("bounces+{TOKEN}@bounce.shop.example").as_str())
    );
    assert!(r.addressed_to.contains(&format!("bounces+{TOKEN}@bounce.shop.example")));
    assert_eq!(r.bounce_tokens(), vec![TOKEN.to_string()]);
    let block = &r.recipients[0];
    assert_eq!(block.status.as_deref(), Some("5.1.1"));
    assert!(block
        .diagnostic
        .as_deref()
        .unwrap_or_default()
        .contains("User unknown in virtual mailbox table"));
    assert_eq!(lead_class(&r), Class::Hard);
    let original = r.original.as_ref().expect("the undelivered message's headers");
    assert_eq!(original.delivery.as_deref(), Some("42"));
    assert_eq!(original.message_id.as_deref(), Some("<42.1762161151@shop.example>"));
    // Both the https link and the mailto subject carry the same unsubscribe token: it is listed once.
    assert_eq!(r.unsubscribe_tokens(), vec![UNSUBSCRIBE.to_string()]);
}

#[test]
fn postfix_policy_full_mailbox_delayed_and_delivered_reports_are_told_apart() {
    let policy = parsed("postfix-policy-5.7.1.msg");
    assert_eq!(policy.recipients[0].status.as_deref(), Some("5.7.1"));
    assert_eq!(lead_class(&policy), Class::Policy);
    assert_eq!(policy.original.as_ref().and_then(|o| o.delivery.as_deref()), Some("42"));

    assert_eq!(lead_class(&parsed("postfix-mailbox-full.msg")), Class::Soft);

    let delayed = parsed("postfix-delayed.msg");
    assert_eq!(delayed.recipients[0].action, Action::Delayed);
    assert_eq!(lead_class(&delayed), Class::Ignore);

    let delivered = parsed("postfix-delivered.msg");
    assert_eq!(delivered.recipients[0].action, Action::Delivered);
    assert_eq!(lead_class(&delivered), Class::Ignore);
}

#[test]
fn an_exim_report_with_a_generic_status_is_refined_by_its_diagnostic() {
    let r = parsed("exim-dsn.msg");
    assert_eq!(r.recipients.len(), 1);
    // Exim writes Status: 5.0.0 and the remote server's 5.1.1 in the diagnostic.
    assert_eq!(r.recipients[0].status.as_deref(), Some("5.1.1"));
    assert_eq!(lead_class(&r), Class::Hard);
    assert_eq!(r.bounce_tokens(), vec![TOKEN.to_string()]);
    assert_eq!(r.original.as_ref().and_then(|o| o.delivery.as_deref()), Some("42"));
}

#[test]
fn a_plain_text_exim_bounce_is_read_heuristically() {
    let r = parsed("exim-plain-text.msg");
    assert_eq!(r.kind, ReportKind::Dsn);
    assert!(r.heuristic);
    assert_eq!(r.recipients.len(), 1);
    assert_eq!(r.recipients[0].final_recipient.as_deref(), Some(LEAD));
    assert_eq!(r.recipients[0].status.as_deref(), Some("5.1.1"));
    assert_eq!(lead_class(&r), Class::Hard);
    assert_eq!(r.bounce_tokens(), vec![TOKEN.to_string()]);
    assert_eq!(r.original.as_ref().and_then(|o| o.delivery.as_deref()), Some("42"));
}

#[test]
fn a_gmail_report_inside_nested_multiparts_is_found() {
    let r = parsed("gmail-account-disabled.msg");
    assert_eq!(r.reporting_mta.as_deref(), Some("googlemail.com"));
    assert_eq!(r.recipients[0].status.as_deref(), Some("5.2.1"));
    assert_eq!(lead_class(&r), Class::Hard);
    assert_eq!(r.bounce_tokens(), vec![TOKEN.to_string()]);
    assert_eq!(r.original.as_ref().and_then(|o| o.delivery.as_deref()), Some("42"));
}

#[test]
fn an_exchange_report_with_a_three_digit_detail_is_hard() {
    let r = parsed("exchange-recipient-not-found.msg");
    assert_eq!(r.recipients[0].status.as_deref(), Some("5.1.10"));
    assert_eq!(lead_class(&r), Class::Hard);
    assert_eq!(r.bounce_tokens(), vec![TOKEN.to_string()]);
    let original = r.original.as_ref().expect("text/rfc822-headers");
    assert_eq!(
        original.return_path.as_deref(),
        Some(format!("bounces+{TOKEN}@bounce.shop.example").as_str())
    );
}

#[test]
fn an_arf_abuse_report_is_a_complaint_with_its_return_path() {
    let r = parsed("arf-abuse.msg");
    assert_eq!(r.kind, ReportKind::Arf);
    let feedback = r.feedback.as_ref().expect("the feedback-report part");
    assert_eq!(feedback.feedback_type.as_deref(), Some("abuse"));
    assert!(feedback.is_complaint());
    assert_eq!(feedback.user_agent.as_deref(), Some("SomeGenerator/1.0"));
    assert_eq!(feedback.original_rcpt_to, vec![LEAD.to_string()]);
    assert_eq!(feedback.reported_domain.as_deref(), Some("shop.example"));
    assert_eq!(r.bounce_tokens(), vec![TOKEN.to_string()]);
    assert_eq!(r.unsubscribe_tokens(), vec![UNSUBSCRIBE.to_string()]);
    assert_eq!(r.original.as_ref().and_then(|o| o.delivery.as_deref()), Some("42"));
    assert!(r.recipients.is_empty());

    let not_spam = parsed("arf-not-spam.msg");
    assert_eq!(not_spam.kind, ReportKind::Arf);
    assert!(!not_spam.feedback.as_ref().is_some_and(|f| f.is_complaint()));
}

#[test]
fn a_mailto_unsubscribe_carries_its_token() {
    let r = parsed("mailto-unsubscribe.msg");
    assert_eq!(r.kind, ReportKind::Unsubscribe);
    assert_eq!(r.unsubscribe_token.as_deref(), Some(UNSUBSCRIBE));
    assert_eq!(r.unsubscribe_tokens(), vec![UNSUBSCRIBE.to_string()]);
    assert!(r.addressed_to.contains(&"unsubscribe@bounce.shop.example".to_string()));
    assert!(r.bounce_tokens().is_empty());
    assert_eq!(r.from.as_deref(), Some(LEAD));
}

#[test]
fn damaged_and_unrelated_messages_are_refused_with_a_reason() {
    let cases = [
        ("truncated-dsn.msg", "malformed"),
        ("dsn-without-status-part.msg", "malformed"),
        ("not-a-report.msg", "neither"),
        ("garbage.msg", ""),
    ];
    for (name, says) in cases {
        let err = parse_report(&sample(name)).expect_err(name);
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
    assert_eq!(parse_report(b""), Err(ParseError::Empty));
    assert_eq!(parse_report(b" \r\n\t"), Err(ParseError::Empty));
}

#[test]
fn every_prefix_of_every_sample_parses_or_is_refused_without_a_panic() {
    let mut samples: Vec<PathBuf> = std::fs::read_dir(samples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "msg"))
        .collect();
    samples.sort();
    assert!(samples.len() >= 15, "{samples:?}");
    for path in samples {
        let raw = std::fs::read(&path).unwrap();
        // Every cut, every flipped byte in steps: the parser answers each.
        for end in (0..raw.len()).step_by(7) {
            let _ = parse_report(&raw[..end]);
        }
        for at in (0..raw.len()).step_by(13) {
            let mut damaged = raw.clone();
            damaged[at] ^= 0x5a;
            let _ = parse_report(&damaged);
        }
    }
}
