//! Reading an uploaded sheet: CSV (delimiter sniffed among `,` `;` and tab, UTF-8 with or without a byte order
//! mark) or the first worksheet of an XLSX workbook, as a header row and data rows numbered by their line in the
//! file (the header is line 1). Blank rows are skipped.

use std::io::Cursor;

use calamine::{DataRef, DataType as _, Reader as _, Xlsx};

/// The file formats an import takes and an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Xlsx,
}

impl Format {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "csv" => Some(Self::Csv),
            "xlsx" => Some(Self::Xlsx),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Xlsx => "xlsx",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        }
    }
}

/// A data row: its line in the file and its cells, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: u32,
    pub cells: Vec<String>,
}

/// A row that cannot be read (the rest of the file still can).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: u32,
    pub detail: String,
}

/// Why a file cannot be read at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An open sheet: its header row, how many data rows follow, then those rows in order.
pub struct Sheet<'w, 'c> {
    pub headers: Vec<String>,
    /// The data rows that are not blank (counted by reading the file once before).
    pub total: usize,
    rows: Rows<'w, 'c>,
}

/// The cells of one XLSX worksheet, read as the file is decompressed (a workbook is never held whole in memory).
type XlsxCells<'w, 'c> = calamine::XlsxCellReader<'w, Cursor<&'c [u8]>>;

enum Rows<'w, 'c> {
    Csv {
        content: &'c [u8],
        reader: csv::Reader<&'c [u8]>,
        /// Line breaks before byte `counted_to` (the csv crate's own line count skips blank lines).
        breaks: u32,
        counted_to: usize,
    },
    Xlsx {
        cells: Box<XlsxCells<'w, 'c>>,
        /// The first cell of the next row, read ahead.
        ahead: Option<(u32, u32, String)>,
        /// Why the rest of the worksheet cannot be read (reported once, at the row it happened in).
        failed: Option<(u32, String)>,
        done: bool,
    },
}

/// Opens `content` and hands the sheet (its header row read, its rows counted) to `read`. The sheet borrows the
/// open workbook, hence the callback.
pub fn with_sheet<R>(format: Format, content: &[u8], read: impl FnOnce(Result<Sheet<'_, '_>, Unreadable>) -> R) -> R {
    match format {
        Format::Csv => read(open_csv(content)),
        Format::Xlsx => {
            let opened: Result<Xlsx<_>, _> = calamine::open_workbook_from_rs(Cursor::new(content));
            let mut workbook = match opened {
                Ok(workbook) => workbook,
                Err(e) => return read(Err(Unreadable(format!("not a readable XLSX workbook: {e}")))),
            };
            let Some(name) = workbook.sheet_names().first().cloned() else {
                return read(Err(Unreadable("the workbook has no worksheet".into())));
            };
            let unreadable = |e: calamine::XlsxError| Unreadable(format!("the first worksheet cannot be read: {e}"));
            // A first pass counts the rows; the second reads them.
            let total = match workbook.worksheet_cells_reader(&name) {
                Ok(cells) => match Sheet::start(xlsx_rows(cells), 0) {
                    Ok(mut sheet) => std::iter::from_fn(|| sheet.next_row()).count(),
                    Err(unreadable) => return read(Err(unreadable)),
                },
                Err(e) => return read(Err(unreadable(e))),
            };
            let sheet = workbook
                .worksheet_cells_reader(&name)
                .map_err(unreadable)
                .and_then(|cells| Sheet::start(xlsx_rows(cells), total));
            read(sheet)
        }
    }
}

/// What a sheet read in the background hands over, in this order: `Opened` (or `Unreadable`), `Rows` batches, `End`.
pub enum Fed {
    Opened { headers: Vec<String>, total: usize },
    Rows(Vec<Result<Row, BadRow>>),
    Unreadable(Unreadable),
    End,
}

/// Reads `content` on a blocking thread, skipping the first `skip` data rows, and hands over the header, then the
/// rows `batch` at a time, through a bounded channel: the reader waits while the importer is behind, and stops
/// when the receiver is dropped.
pub fn read_in_background(
    format: Format,
    content: Vec<u8>,
    skip: usize,
    batch: usize,
) -> tokio::sync::mpsc::Receiver<Fed> {
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        with_sheet(format, &content, |opened| {
            let mut sheet = match opened {
                Ok(sheet) => sheet,
                Err(unreadable) => {
                    let _ = sender.blocking_send(Fed::Unreadable(unreadable));
                    return;
                }
            };
            let opened = Fed::Opened {
                headers: sheet.headers.clone(),
                total: sheet.total,
            };
            if sender.blocking_send(opened).is_err() {
                return;
            }
            for _ in 0..skip {
                if sheet.next_row().is_none() {
                    break;
                }
            }
            loop {
                let rows: Vec<_> = std::iter::from_fn(|| sheet.next_row()).take(batch).collect();
                if rows.is_empty() {
                    let _ = sender.blocking_send(Fed::End);
                    return;
                }
                if sender.blocking_send(Fed::Rows(rows)).is_err() {
                    return;
                }
            }
        })
    });
    receiver
}

fn open_csv(content: &[u8]) -> Result<Sheet<'_, '_>, Unreadable> {
    let content = content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content);
    if content.starts_with(b"PK\x03\x04") {
        return Err(Unreadable(
            "this is an XLSX workbook, not CSV text; import it with format=xlsx".into(),
        ));
    }
    let delimiter = sniff_delimiter(content);
    let rows = |reader| Rows::Csv {
        content,
        reader,
        breaks: 0,
        counted_to: 0,
    };
    let mut counting = Sheet::start(rows(csv_reader(content, delimiter)), 0)?;
    let total = std::iter::from_fn(|| counting.next_row()).count();
    Sheet::start(rows(csv_reader(content, delimiter)), total)
}

fn xlsx_rows<'w, 'c>(cells: XlsxCells<'w, 'c>) -> Rows<'w, 'c> {
    Rows::Xlsx {
        cells: Box::new(cells),
        ahead: None,
        failed: None,
        done: false,
    }
}

impl<'w, 'c> Sheet<'w, 'c> {
    /// Reads the header row (the first row that is not blank).
    fn start(rows: Rows<'w, 'c>, total: usize) -> Result<Self, Unreadable> {
        let mut sheet = Sheet {
            headers: Vec::new(),
            total,
            rows,
        };
        match sheet.next_row() {
            Some(Ok(header)) => {
                sheet.headers = header.cells.iter().map(|h| h.trim().to_string()).collect();
                Ok(sheet)
            }
            Some(Err(bad)) => Err(Unreadable(format!(
                "the header row (line {}): {}",
                bad.line, bad.detail
            ))),
            None => Err(Unreadable("the file is empty: no header row".into())),
        }
    }

    /// The next row that is not blank.
    pub fn next_row(&mut self) -> Option<Result<Row, BadRow>> {
        match &mut self.rows {
            Rows::Csv {
                content,
                reader,
                breaks,
                counted_to,
            } => loop {
                let mut record = csv::ByteRecord::new();
                let mut line_at = |byte: u64| {
                    let mut byte = usize::try_from(byte).unwrap_or(usize::MAX).min(content.len());
                    // A record's position is where reading began, before the blank lines it skipped.
                    while matches!(content.get(byte), Some(b'\n' | b'\r')) {
                        byte += 1;
                    }
                    if byte > *counted_to {
                        let seen = content[*counted_to..byte].iter().filter(|b| **b == b'\n').count();
                        *breaks += u32::try_from(seen).unwrap_or(u32::MAX);
                        *counted_to = byte;
                    }
                    *breaks + 1
                };
                match reader.read_byte_record(&mut record) {
                    Ok(false) => return None,
                    Ok(true) => {
                        let line = line_at(record.position().map_or(0, |p| p.byte()));
                        if record.iter().all(|cell| cell.trim_ascii().is_empty()) {
                            continue;
                        }
                        let cells: Result<Vec<String>, _> = record
                            .iter()
                            .map(|c| std::str::from_utf8(c).map(str::to_string))
                            .collect();
                        return Some(match cells {
                            Ok(cells) => Ok(Row { line, cells }),
                            Err(_) => Err(BadRow {
                                line,
                                detail: "the line is not UTF-8 text; save the file as \"CSV UTF-8\"".into(),
                            }),
                        });
                    }
                    Err(e) => {
                        let line = line_at(e.position().map_or(0, |p| p.byte()));
                        return Some(Err(BadRow {
                            line,
                            detail: format!("the line cannot be read as CSV: {e}"),
                        }));
                    }
                }
            },
            Rows::Xlsx {
                cells,
                ahead,
                failed,
                done,
            } => loop {
                if let Some((line, detail)) = failed.take() {
                    *done = true;
                    return Some(Err(BadRow { line, detail }));
                }
                if *done && ahead.is_none() {
                    return None;
                }
                let first = match ahead.take() {
                    Some(cell) => cell,
                    None => match next_cell(cells) {
                        Ok(Some(cell)) => cell,
                        Ok(None) => return None,
                        Err(detail) => {
                            *done = true;
                            return Some(Err(BadRow { line: 0, detail }));
                        }
                    },
                };
                let row = first.0;
                let mut values: Vec<String> = Vec::new();
                let mut place = |(_, col, text): (u32, u32, String)| {
                    let col = col as usize;
                    if values.len() <= col {
                        values.resize(col + 1, String::new());
                    }
                    values[col] = text;
                };
                place(first);
                while !*done {
                    match next_cell(cells) {
                        Ok(Some(cell)) if cell.0 == row => place(cell),
                        Ok(Some(cell)) => {
                            *ahead = Some(cell);
                            break;
                        }
                        Ok(None) => *done = true,
                        Err(detail) => {
                            *failed = Some((row + 2, detail));
                            break;
                        }
                    }
                }
                if values.iter().all(|v| v.trim().is_empty()) {
                    continue;
                }
                return Some(Ok(Row {
                    line: row + 1,
                    cells: values,
                }));
            },
        }
    }
}

/// The next cell of a worksheet as (row, column, text), or why the worksheet cannot be read further.
fn next_cell(cells: &mut XlsxCells<'_, '_>) -> Result<Option<(u32, u32, String)>, String> {
    match cells.next_cell() {
        Ok(Some(cell)) => {
            let (row, col) = cell.get_position();
            Ok(Some((row, col, cell_text(cell.get_value()))))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(format!("the rest of the worksheet cannot be read: {e}")),
    }
}

fn csv_reader(content: &[u8], delimiter: u8) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        // The header row is read as a row like any other, so its line is known and blank lines before it skipped.
        .has_headers(false)
        // Rows may be shorter or longer than the header; missing cells are empty, extra cells ignored.
        .flexible(true)
        .from_reader(content)
}

/// The delimiter of the first line: whichever of `,` `;` and tab occurs most often outside quotes (`,` on a tie).
pub fn sniff_delimiter(content: &[u8]) -> u8 {
    let mut counts = [(b',', 0usize), (b';', 0), (b'\t', 0)];
    let mut quoted = false;
    for &byte in content.iter().take(64 * 1024) {
        match byte {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => break,
            _ if !quoted => {
                if let Some(entry) = counts.iter_mut().find(|(d, _)| *d == byte) {
                    entry.1 += 1;
                }
            }
            _ => {}
        }
    }
    let mut best = counts[0];
    for entry in &counts[1..] {
        if entry.1 > best.1 {
            best = *entry;
        }
    }
    best.0
}

/// A cell as text: whole numbers without a fraction (postal codes, phone numbers typed as numbers), dates as
/// `YYYY-MM-DD` (with a time when there is one), errors as empty.
fn cell_text(cell: &DataRef<'_>) -> String {
    match cell {
        DataRef::Empty | DataRef::Error(_) => String::new(),
        DataRef::String(s) | DataRef::DateTimeIso(s) | DataRef::DurationIso(s) => s.clone(),
        DataRef::SharedString(s) => (*s).to_string(),
        DataRef::Int(i) => i.to_string(),
        DataRef::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        DataRef::Float(f) => f.to_string(),
        DataRef::Bool(b) => b.to_string(),
        DataRef::DateTime(_) => match cell.as_datetime() {
            Some(at) if at.time() == chrono::NaiveTime::MIN => at.format("%Y-%m-%d").to_string(),
            Some(at) => at.format("%Y-%m-%dT%H:%M:%S").to_string(),
            None => String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(format: Format, content: &[u8]) -> (Vec<String>, Vec<Result<Row, BadRow>>) {
        with_sheet(format, content, |sheet| {
            let mut sheet = sheet.unwrap();
            let rows: Vec<_> = std::iter::from_fn(|| sheet.next_row()).collect();
            assert_eq!(sheet.total, rows.len());
            (sheet.headers, rows)
        })
    }

    fn opens(format: Format, content: &[u8]) -> bool {
        with_sheet(format, content, |sheet| sheet.is_ok())
    }

    #[test]
    fn the_delimiter_is_the_one_the_header_uses() {
        assert_eq!(sniff_delimiter(b"email;city;\"a,b,c\"\nx,y"), b';');
        assert_eq!(sniff_delimiter(b"email\tcity\n"), b'\t');
        assert_eq!(sniff_delimiter(b"email,city\n"), b',');
        assert_eq!(sniff_delimiter(b"email\n"), b',');
    }

    #[test]
    fn rows_carry_their_file_line_past_blank_lines_and_quoted_line_breaks() {
        let csv = "\u{feff}Email;City\n\nann@example.com;\"Bad\nHonnef\"\nbob@example.com;Köln\n";
        let (headers, rows) = rows(Format::Csv, csv.as_bytes());
        assert_eq!(headers, ["Email", "City"]);
        let rows: Vec<Row> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[0].cells, ["ann@example.com", "Bad\nHonnef"]);
        assert_eq!(rows[1].line, 5);
        assert_eq!(rows[1].cells, ["bob@example.com", "Köln"]);
    }

    #[test]
    fn a_line_that_is_not_utf8_is_a_bad_row_and_the_rest_is_read() {
        let (_, rows) = rows(Format::Csv, b"email,city\na@example.com,K\xf6ln\nb@example.com,Bonn\n");
        assert_eq!(rows[0].as_ref().unwrap_err().line, 2);
        assert_eq!(rows[1].as_ref().unwrap().line, 3);
    }

    #[test]
    fn rows_are_counted_without_the_header_or_blank_lines() {
        let total = with_sheet(Format::Csv, b"email\na@example.com\n\n,\nb@example.com\n", |s| {
            s.unwrap().total
        });
        assert_eq!(total, 2);
    }

    #[test]
    fn an_xlsx_sheet_reads_numbers_as_text_and_numbers_lines_from_one() {
        let mut workbook = rust_xlsxwriter::Workbook::new();
        let sheet = workbook.add_worksheet();
        sheet.write_string(0, 0, "Email").unwrap();
        sheet.write_string(0, 1, "Zip").unwrap();
        sheet.write_string(2, 0, "ann@example.com").unwrap();
        sheet.write_number(2, 1, 10115.0).unwrap();
        let bytes = workbook.save_to_buffer().unwrap();
        let (headers, rows) = rows(Format::Xlsx, &bytes);
        assert_eq!(headers, ["Email", "Zip"]);
        let row = rows[0].as_ref().unwrap();
        assert_eq!(row.line, 3);
        assert_eq!(row.cells, ["ann@example.com", "10115"]);
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn xlsx_rows_with_gaps_keep_their_columns_and_dates_read_as_dates() {
        let mut workbook = rust_xlsxwriter::Workbook::new();
        let sheet = workbook.add_worksheet();
        let date = rust_xlsxwriter::Format::new().set_num_format("yyyy-mm-dd");
        let born = rust_xlsxwriter::ExcelDateTime::from_ymd(1990, 1, 12).unwrap();
        for (col, header) in ["Email", "Zip", "Born"].into_iter().enumerate() {
            sheet.write_string(0, col as u16, header).unwrap();
        }
        sheet.write_string(1, 0, "ann@example.com").unwrap();
        sheet.write_datetime_with_format(1, 2, &born, &date).unwrap();
        sheet.write_string(4, 1, "50667").unwrap();
        let bytes = workbook.save_to_buffer().unwrap();
        let (_, rows) = rows(Format::Xlsx, &bytes);
        let rows: Vec<Row> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[0].cells, ["ann@example.com", "", "1990-01-12"]);
        assert_eq!(rows[1].line, 5);
        assert_eq!(rows[1].cells, ["", "50667"]);
    }

    #[test]
    fn an_xlsx_file_sent_as_csv_is_refused_with_a_hint() {
        assert!(!opens(Format::Csv, b"PK\x03\x04rest"));
        assert!(!opens(Format::Xlsx, b"email\nx@example.com\n"));
        assert!(!opens(Format::Csv, b"\n\n"));
    }
}
