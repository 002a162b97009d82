//! The one library every leadflow service uses: domain types, configuration, database, AMQP topology, telemetry.

pub mod amqp;
pub mod config;
pub mod db;
pub mod domain;
pub mod dsn;
pub mod http;
pub mod lead_filter;
pub mod messages;
pub mod service;
pub mod settings;
pub mod suppression;
pub mod telemetry;
pub mod tokens;
pub mod topology;
