//! Plain-text layouts for table mode: column tables with a header row, and `key: value` blocks.
//!
//! No colours and no terminal probing: the same bytes go to a terminal, a pipe or a file, so output piped into
//! `grep` or `awk` looks exactly like what a person saw.

/// Space between two columns.
const GAP: &str = "  ";

/// How a column's cells line up: text to the left, numbers to the right so their digits line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table with a header row; every column is as wide as its widest cell.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Adds a row. Missing cells render empty and extra cells are dropped, so a row never shifts columns.
    pub fn push_row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the header and rows, each line ending in a newline and without trailing spaces.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(column, (header, _))| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(column))
                    .map(|cell| display_width(cell))
                    .chain(std::iter::once(display_width(header)))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let header: Vec<&str> = self.headers.iter().map(|(name, _)| *name).collect();
        let mut out = String::new();
        self.render_line(&mut out, &widths, &header);
        for row in &self.rows {
            let cells: Vec<&str> =
                (0..self.headers.len()).map(|column| row.get(column).map_or("", String::as_str)).collect();
            self.render_line(&mut out, &widths, &cells);
        }
        out
    }

    fn render_line(&self, out: &mut String, widths: &[usize], cells: &[&str]) {
        let mut line = String::new();
        for (column, cell) in cells.iter().enumerate() {
            if column > 0 {
                line.push_str(GAP);
            }
            let padding = " ".repeat(widths[column].saturating_sub(display_width(cell)));
            match self.headers[column].1 {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&padding);
                }
                Align::Right => {
                    line.push_str(&padding);
                    line.push_str(cell);
                }
            }
        }
        // The last column's padding (and any empty trailing cells) would only be invisible trailing spaces.
        out.push_str(line.trim_end_matches(' '));
        out.push('\n');
    }
}

/// A block of `key: value` lines with the values lined up.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    lines: Vec<(String, String)>,
}

impl Fields {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, key: &str, value: impl Into<String>) {
        self.lines.push((key.to_owned(), value.into()));
    }

    /// Renders one line per field, values starting one column after the longest `key:`.
    pub fn render(&self) -> String {
        let key_width = self.lines.iter().map(|(key, _)| display_width(key) + 1).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value) in &self.lines {
            let label = format!("{key}:");
            let padding = " ".repeat(key_width - display_width(&label) + 1);
            out.push_str(format!("{label}{padding}{value}").trim_end_matches(' '));
            out.push('\n');
        }
        out
    }
}

/// Width of a cell in terminal columns, counted as characters: exact for the ASCII that ids, addresses and
/// numbers are made of, and close enough for topic names.
fn display_width(text: &str) -> usize {
    text.chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_text_left_and_numbers_right() {
        let mut table = Table::new(&[("NAME", Align::Left), ("COUNT", Align::Right), ("NOTE", Align::Left)]);
        table.push_row(vec!["alpha".into(), "7".into(), "first".into()]);
        table.push_row(vec!["b".into(), "12345".into(), "".into()]);
        assert_eq!(
            table.render(),
            "NAME   COUNT  NOTE\n\
             alpha      7  first\n\
             b      12345\n"
        );
    }

    #[test]
    fn header_wider_than_cells_sets_the_width() {
        let mut table = Table::new(&[("LONG HEADER", Align::Left), ("N", Align::Right)]);
        table.push_row(vec!["x".into(), "1".into()]);
        assert_eq!(table.render(), "LONG HEADER  N\nx            1\n");
    }

    #[test]
    fn short_and_long_rows_keep_their_columns() {
        let mut table = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        table.push_row(vec!["only-a".into()]);
        table.push_row(vec!["1".into(), "2".into(), "dropped".into()]);
        assert_eq!(table.render(), "A       B\nonly-a\n1       2\n");
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut table = Table::new(&[("T", Align::Left), ("N", Align::Right)]);
        table.push_row(vec!["ünï".into(), "1".into()]);
        table.push_row(vec!["abcd".into(), "2".into()]);
        assert_eq!(table.render(), "T     N\nünï   1\nabcd  2\n");
    }

    #[test]
    fn empty_table_is_just_the_header() {
        let table = Table::new(&[("A", Align::Left), ("B", Align::Right)]);
        assert_eq!(table.render(), "A  B\n");
    }

    #[test]
    fn fields_line_up_values() {
        let mut fields = Fields::new();
        fields.add("node id", "abc");
        fields.add("uptime", "1h");
        fields.add("empty", "");
        assert_eq!(fields.render(), "node id: abc\nuptime:  1h\nempty:\n");
    }
}
