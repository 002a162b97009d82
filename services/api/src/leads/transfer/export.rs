//! Exporting leads, streamed so memory stays bounded however many match:
//!
//! - CSV: the rows come from one query's row stream (tokio-postgres reads the socket only as fast as rows are taken,
//!   a channel of one message between them) and go out as body chunks of about 64 KiB as they are encoded. The
//!   first byte leaves before the last row is read.
//! - XLSX: a workbook cannot be sent before it is complete (it is a zip with a directory at the end). Rows are
//!   written by rust_xlsxwriter in constant-memory mode (each row flushed to a temporary file as it is written, on
//!   a blocking thread fed through a bounded channel), the workbook assembled in a temporary file, and that file
//!   streamed. Memory stays bounded; the answer starts once the workbook is written.

use std::io;
use std::pin::Pin;

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use deadpool_postgres::Object;
use futures_util::StreamExt as _;
use rust_xlsxwriter::{Workbook, XlsxError};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::RowStream;

use super::columns::{self, Cell};
use leadflow_shared::lead_filter::Param;

/// The size a CSV body chunk grows to before it is sent.
const CHUNK_BYTES: usize = 64 * 1024;
/// Rows handed to the XLSX writer at a time.
const XLSX_BATCH: usize = 200;
/// The most rows a worksheet holds (Excel's limit, header included); more go on another sheet.
const SHEET_ROWS: u32 = 1_048_576;

/// The query that selects the exported leads, as `to_jsonb(l)`, in order.
pub struct Selection {
    pub condition: String,
    pub params: Vec<Param>,
    pub order_by: String,
}

async fn rows(client: &Object, selection: &Selection) -> Result<RowStream, tokio_postgres::Error> {
    let sql = format!(
        "SELECT to_jsonb(l) FROM leads l WHERE {} ORDER BY {}",
        selection.condition, selection.order_by
    );
    let params = selection.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync));
    client.query_raw(&sql, params).await
}

/// One CSV line, quoted where needed (RFC 4180), ending in CRLF.
pub fn csv_line(cells: impl IntoIterator<Item = String>, out: &mut Vec<u8>) {
    for (i, cell) in cells.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let quote = cell.contains([',', '"', '\n', '\r']) || cell.starts_with(' ') || cell.ends_with(' ');
        if quote {
            out.push(b'"');
            out.extend_from_slice(cell.replace('"', "\"\"").as_bytes());
            out.push(b'"');
        } else {
            out.extend_from_slice(cell.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The connection an export reads over. Dropped before the last row was read (the client went away), it cancels
/// the query and leaves the pool: it is closed once the server has stopped sending, and no other request can get
/// it in the meantime (nor have its own query hit by the late cancellation).
struct Reading {
    client: Option<Object>,
    finished: bool,
}

impl Reading {
    fn new(client: Object) -> Self {
        Self {
            client: Some(client),
            finished: false,
        }
    }

    fn client(&self) -> &Object {
        self.client.as_ref().expect("the client is only taken on drop")
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let Some(client) = self.client.take().filter(|_| !self.finished) else {
            return;
        };
        let token = client.cancel_token();
        let detached = Object::take(client);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = token.cancel_query(tokio_postgres::NoTls).await {
                    tracing::warn!(error = %e, "failed to cancel an abandoned export's query");
                }
                drop(detached);
            });
        }
    }
}

/// What the CSV body stream holds between chunks: the connection the rows come over and the rows still to read.
struct CsvState {
    reading: Reading,
    rows: Pin<Box<RowStream>>,
    columns: Vec<String>,
    header: bool,
}

/// The CSV body: a header line, then a line per lead.
pub async fn csv(client: Object, columns: Vec<String>, selection: Selection) -> anyhow::Result<Body> {
    let reading = Reading::new(client);
    let rows = rows(reading.client(), &selection)
        .await
        .context("failed to select the leads to export")?;
    let state = CsvState {
        reading,
        rows: Box::pin(rows),
        columns,
        header: true,
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
        if state.header {
            csv_line(state.columns.iter().cloned(), &mut chunk);
            state.header = false;
        }
        while chunk.len() < CHUNK_BYTES {
            match state.rows.next().await {
                Some(Ok(row)) => {
                    let lead: Value = match row.try_get(0) {
                        Ok(lead) => lead,
                        Err(e) => return Some((Err(failed(e)), None)),
                    };
                    csv_line(columns::cells(&lead, &state.columns).iter().map(Cell::text), &mut chunk);
                }
                Some(Err(e)) => return Some((Err(failed(e)), None)),
                None => {
                    state.reading.finished = true;
                    return (!chunk.is_empty()).then(|| (Ok(Bytes::from(chunk)), None));
                }
            }
        }
        Some((Ok(Bytes::from(chunk)), Some(state)))
    });
    Ok(Body::from_stream(stream))
}

/// A database failure in the middle of a streamed body: logged, and the body ends early (the client sees a
/// truncated transfer, not a complete-looking file).
fn failed(e: tokio_postgres::Error) -> io::Error {
    tracing::error!(error = %e, "export stopped: reading leads failed");
    io::Error::other("reading the exported leads failed")
}

/// The XLSX body: the workbook written to a temporary file in constant memory, then streamed from it.
pub async fn xlsx(client: Object, columns: Vec<String>, selection: Selection) -> anyhow::Result<(Body, u64)> {
    let file = tempfile::NamedTempFile::new().context("failed to create a temporary file for the workbook")?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<Vec<Cell>>>(2);
    let header = columns.clone();
    // The writer owns the file: if the client goes away mid-export, the file is removed when the writer ends.
    let writer = tokio::task::spawn_blocking(move || write_workbook(file, &header, receiver));
    let mut reading = Reading::new(client);
    let pumped = pump(reading.client(), &columns, &selection, sender).await;
    reading.finished = matches!(pumped, Ok(true));
    drop(reading);
    let written = writer.await.context("the workbook writer panicked")?;
    pumped?;
    let file = written.context("failed to write the workbook")?;
    // The open handle keeps the content readable once the temporary file's name is removed.
    let handle = file.reopen().context("failed to reopen the written workbook")?;
    drop(file);
    let size = handle.metadata().context("failed to size the written workbook")?.len();
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(handle));
    Ok((Body::from_stream(stream), size))
}

/// Reads the leads and hands them to the workbook writer in batches (waiting while it is behind); `true` once
/// every row was read.
async fn pump(
    client: &Object,
    columns: &[String],
    selection: &Selection,
    sender: tokio::sync::mpsc::Sender<Vec<Vec<Cell>>>,
) -> anyhow::Result<bool> {
    let mut rows = Box::pin(
        rows(client, selection)
            .await
            .context("failed to select the leads to export")?,
    );
    let mut batch = Vec::with_capacity(XLSX_BATCH);
    while let Some(row) = rows.next().await {
        let row = row.context("failed to read the leads to export")?;
        let lead: Value = row.try_get(0).context("failed to read an exported lead")?;
        batch.push(columns::cells(&lead, columns));
        if batch.len() == XLSX_BATCH && sender.send(std::mem::take(&mut batch)).await.is_err() {
            // The writer stopped (its error is reported by the caller).
            return Ok(false);
        }
    }
    if !batch.is_empty() {
        let _ = sender.send(batch).await;
    }
    Ok(true)
}

/// Writes the header and every batch received into a workbook in `file` (sheets "Leads", "Leads 2", ...).
fn write_workbook(
    mut file: tempfile::NamedTempFile,
    header: &[String],
    mut receiver: tokio::sync::mpsc::Receiver<Vec<Vec<Cell>>>,
) -> Result<tempfile::NamedTempFile, XlsxError> {
    let mut workbook = Workbook::new();
    let mut sheets = 0usize;
    let mut row: u32 = SHEET_ROWS;
    while let Some(batch) = receiver.blocking_recv() {
        for cells in batch {
            if row == SHEET_ROWS {
                sheets += 1;
                let sheet = workbook.add_worksheet_with_constant_memory()?;
                sheet.set_name(if sheets == 1 {
                    "Leads".to_string()
                } else {
                    format!("Leads {sheets}")
                })?;
                for (col, name) in header.iter().enumerate() {
                    sheet.write_string(0, col as u16, name)?;
                }
                row = 1;
            }
            let sheet = workbook.worksheet_from_index(sheets - 1)?;
            for (col, cell) in cells.iter().enumerate() {
                match cell {
                    Cell::Number(n) => {
                        sheet.write_number(row, col as u16, *n)?;
                    }
                    Cell::Text(text) if !text.is_empty() => {
                        sheet.write_string(row, col as u16, text)?;
                    }
                    Cell::Text(_) => {}
                }
            }
            row += 1;
        }
    }
    if sheets == 0 {
        let sheet = workbook.add_worksheet_with_constant_memory()?;
        sheet.set_name("Leads")?;
        for (col, name) in header.iter().enumerate() {
            sheet.write_string(0, col as u16, name)?;
        }
    }
    workbook.save_to_writer(io::BufWriter::new(file.as_file_mut()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_only_where_needed() {
        let mut out = Vec::new();
        csv_line(
            ["plain", "a,b", "say \"hi\"", "two\nlines", ""].map(String::from),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\r\n"
        );
    }
}
