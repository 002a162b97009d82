//! Reading an uploaded sheet: CSV (delimiter sniffed among `,` `;` and tab, UTF-8 with or without a byte order
//! mark) or the first worksheet of an XLSX workbook, as a header row and data rows numbered by their line in the
//! file (the header is line 1). Blank rows are skipped.

use std::io::Cursor;

use calamine::{Data, DataType as _, Reader as _, Xlsx};

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

/// An open sheet: its header row, then its data rows in order.
pub struct Sheet<'a> {
    pub headers: Vec<String>,
    rows: Rows<'a>,
}

enum Rows<'a> {
    Csv {
        content: &'a [u8],
        delimiter: u8,
        reader: csv::Reader<&'a [u8]>,
        /// Line breaks before byte `counted_to` (the csv crate's own line count skips blank lines).
        breaks: u32,
        counted_to: usize,
    },
    Xlsx {
        range: calamine::Range<Data>,
        /// The next row of `range` to read.
        next: usize,
        /// The line of the range's first row.
        first_line: u32,
    },
}

impl<'a> Sheet<'a> {
    /// Opens `content` and reads its header row (the first row that is not blank).
    pub fn open(format: Format, content: &'a [u8]) -> Result<Self, Unreadable> {
        let mut sheet = match format {
            Format::Csv => {
                let content = content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content);
                if content.starts_with(b"PK\x03\x04") {
                    return Err(Unreadable(
                        "this is an XLSX workbook, not CSV text; import it with format=xlsx".into(),
                    ));
                }
                let delimiter = sniff_delimiter(content);
                Sheet {
                    headers: Vec::new(),
                    rows: Rows::Csv {
                        content,
                        delimiter,
                        reader: csv_reader(content, delimiter),
                        breaks: 0,
                        counted_to: 0,
                    },
                }
            }
            Format::Xlsx => {
                let mut workbook: Xlsx<_> = calamine::open_workbook_from_rs(Cursor::new(content))
                    .map_err(|e| Unreadable(format!("not a readable XLSX workbook: {e}")))?;
                let range = workbook
                    .worksheet_range_at(0)
                    .ok_or_else(|| Unreadable("the workbook has no worksheet".into()))?
                    .map_err(|e| Unreadable(format!("the first worksheet cannot be read: {e}")))?;
                let first_line = range.start().map_or(1, |(row, _)| row + 1);
                Sheet {
                    headers: Vec::new(),
                    rows: Rows::Xlsx {
                        range,
                        next: 0,
                        first_line,
                    },
                }
            }
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

    /// How many data rows (not blank) follow the header; reads the rest of the file once more.
    pub fn count_rows(&self) -> usize {
        match &self.rows {
            Rows::Csv { content, delimiter, .. } => {
                let mut reader = csv_reader(content, *delimiter);
                let mut record = csv::ByteRecord::new();
                let mut count = 0usize;
                while let Ok(true) = reader.read_byte_record(&mut record) {
                    if !record.iter().all(|cell| cell.trim_ascii().is_empty()) {
                        count += 1;
                    }
                }
                // The header row was counted too.
                count.saturating_sub(1)
            }
            Rows::Xlsx { range, next, .. } => range
                .rows()
                .skip(*next)
                .filter(|row| !row.iter().all(|cell| cell_text(cell).trim().is_empty()))
                .count(),
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
                ..
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
                range,
                next,
                first_line,
            } => loop {
                let index = *next;
                let row = range.rows().nth(index)?;
                *next += 1;
                let cells: Vec<String> = row.iter().map(cell_text).collect();
                if cells.iter().all(|c| c.trim().is_empty()) {
                    continue;
                }
                return Some(Ok(Row {
                    line: *first_line + index as u32,
                    cells,
                }));
            },
        }
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
fn cell_text(cell: &Data) -> String {
    match cell {
        Data::Empty | Data::Error(_) => String::new(),
        Data::String(s) | Data::DateTimeIso(s) | Data::DurationIso(s) => s.clone(),
        Data::Int(i) => i.to_string(),
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        Data::Float(f) => f.to_string(),
        Data::Bool(b) => b.to_string(),
        Data::DateTime(_) => match cell.as_datetime() {
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
        let mut sheet = Sheet::open(format, content).unwrap();
        let mut rows = Vec::new();
        while let Some(row) = sheet.next_row() {
            rows.push(row);
        }
        (sheet.headers, rows)
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
        let sheet = Sheet::open(Format::Csv, b"email\na@example.com\n\n,\nb@example.com\n").unwrap();
        assert_eq!(sheet.count_rows(), 2);
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
    fn an_xlsx_file_sent_as_csv_is_refused_with_a_hint() {
        assert!(Sheet::open(Format::Csv, b"PK\x03\x04rest").is_err());
        assert!(Sheet::open(Format::Xlsx, b"email\nx@example.com\n").is_err());
    }
}
