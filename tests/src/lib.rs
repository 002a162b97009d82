//! End-to-end test support: a per-test pipeline ([`harness::TestApp`]) and a capturing SMTP server ([`smtp`]).

pub mod api;
pub mod harness;
pub mod smtp;

pub use api::{with_query, Answer, ApiClient};
pub use harness::{event, wait_until, DeliveryRow, ServiceProcess, TestApp, TestAppBuilder, DEADLINE, TEST_TOKEN_KEYS};
pub use smtp::{Captured, Rule, SmtpServer, Stage};
