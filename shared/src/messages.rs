//! Versioned messages between services. Payloads carry ids; the consumer reloads state from PostgreSQL.
//! A message type is never changed in place: a new shape is a new variant (`...V2`).

use serde::{Deserialize, Serialize};

use crate::topology::WorkQueue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WorkMessage {
    /// ingest -> scheduler: these events are stored; enroll, cancel or attribute as they say.
    #[serde(rename = "event.accepted.v1")]
    EventAcceptedV1 { event_ids: Vec<i64> },
    /// scheduler -> renderer: these deliveries came due and are queued.
    #[serde(rename = "deliveries.due.v1")]
    DeliveriesDueV1 { delivery_ids: Vec<i64> },
    /// renderer -> sender (and scheduler -> sender for retries): these deliveries are rendered.
    #[serde(rename = "email.ready.v1")]
    EmailReadyV1 { delivery_ids: Vec<i64> },
}

impl WorkMessage {
    /// The queue that consumes this message.
    pub fn queue(&self) -> WorkQueue {
        match self {
            Self::EventAcceptedV1 { .. } => WorkQueue::Scheduler,
            Self::DeliveriesDueV1 { .. } => WorkQueue::Renderer,
            Self::EmailReadyV1 { .. } => WorkQueue::Sender,
        }
    }

    /// The message type as it appears in the envelope (`type` property and JSON tag).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EventAcceptedV1 { .. } => "event.accepted.v1",
            Self::DeliveriesDueV1 { .. } => "deliveries.due.v1",
            Self::EmailReadyV1 { .. } => "email.ready.v1",
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_their_type_tag() {
        let m = WorkMessage::DeliveriesDueV1 {
            delivery_ids: vec![1, 2],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"type":"deliveries.due.v1","delivery_ids":[1,2]}"#);
        assert_eq!(WorkMessage::decode(json.as_bytes()).unwrap(), m);
        assert!(WorkMessage::decode(br#"{"type":"deliveries.due.v9","delivery_ids":[1]}"#).is_err());
        assert_eq!(m.queue(), WorkQueue::Renderer);
    }
}
