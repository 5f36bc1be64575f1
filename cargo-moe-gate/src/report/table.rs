//! A small table renderer shared by the terminal and markdown reports: first column left-aligned, the
//! others right-aligned (they hold numbers).

/// A table of strings with a header row.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<S: ToString>(header: impl IntoIterator<Item = S>) -> Self {
        Self { header: header.into_iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    /// Appends a row (missing cells are empty, extra cells are dropped).
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(|s| s.to_string()).collect();
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Aligned plain text, indented by `indent` spaces.
    pub fn to_text(&self, indent: usize) -> String {
        let widths = self.widths();
        let pad = " ".repeat(indent);
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            out.push_str(&pad);
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                let n = cell.chars().count();
                let fill = " ".repeat(w.saturating_sub(n));
                if i == 0 {
                    out.push_str(cell);
                    if i + 1 < cells.len() {
                        out.push_str(&fill);
                    }
                } else {
                    out.push_str(&fill);
                    out.push_str(cell);
                }
            }
            out.push('\n');
        };
        line(&self.header, &mut out);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule, &mut out);
        for row in &self.rows {
            line(row, &mut out);
        }
        out
    }

    /// A GitHub-flavoured markdown table (`|` in cells escaped).
    pub fn to_markdown(&self) -> String {
        let esc = |s: &String| s.replace('|', "\\|");
        let mut out = String::new();
        out.push_str(&format!("| {} |\n", self.header.iter().map(esc).collect::<Vec<_>>().join(" | ")));
        let align: Vec<&str> =
            (0..self.header.len()).map(|i| if i == 0 { ":---" } else { "---:" }).collect();
        out.push_str(&format!("| {} |\n", align.join(" | ")));
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.iter().map(esc).collect::<Vec<_>>().join(" | ")));
        }
        out
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        widths
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_columns_align() {
        let mut t = Table::new(["layer", "cosine"]);
        t.row(["0", "0.99"]);
        t.row(["12", "1"]);
        assert_eq!(t.to_text(2), "  layer  cosine\n  -----  ------\n  0        0.99\n  12          1\n");
    }

    #[test]
    fn markdown_escapes_pipes_and_pads_rows() {
        let mut t = Table::new(["a", "b"]);
        t.row(["x|y"]);
        assert_eq!(t.to_markdown(), "| a | b |\n| :--- | ---: |\n| x\\|y |  |\n");
    }
}
