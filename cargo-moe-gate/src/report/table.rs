//! A small table renderer shared by the terminal and markdown reports: columns whose cells are all
//! numbers are right-aligned, the others left-aligned.

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
        let right = self.numeric_columns();
        let pad = " ".repeat(indent);
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut text = pad.clone();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let fill = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
                if right[i] {
                    text.push_str(&fill);
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.push_str(&fill);
                }
            }
            out.push_str(text.trim_end());
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
            self.numeric_columns().iter().map(|&r| if r { "---:" } else { ":---" }).collect();
        out.push_str(&format!("| {} |\n", align.join(" | ")));
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.iter().map(esc).collect::<Vec<_>>().join(" | ")));
        }
        out
    }

    /// Whether each column holds numbers only (empty cells aside); the first column never does.
    fn numeric_columns(&self) -> Vec<bool> {
        let numeric = |cell: &str| {
            cell.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.')
                || cell.starts_with("NaN")
                || cell.starts_with("inf")
        };
        (0..self.header.len())
            .map(|i| {
                i > 0
                    && self.rows.iter().any(|r| !r[i].is_empty())
                    && self.rows.iter().all(|r| r[i].is_empty() || numeric(&r[i]))
            })
            .collect()
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
        let mut t = Table::new(["criterion", "metric", "passed"]);
        t.row(["A", "cosine", "3/4"]);
        t.row(["LONGER", "nmse", "12/12"]);
        assert_eq!(
            t.to_text(0),
            "criterion  metric  passed\n---------  ------  ------\nA          cosine     3/4\nLONGER     nmse     12/12\n"
        );
    }

    #[test]
    fn markdown_escapes_pipes_and_pads_rows() {
        let mut t = Table::new(["a", "b"]);
        t.row(["x|y"]);
        assert_eq!(t.to_markdown(), "| a | b |\n| :--- | :--- |\n| x\\|y |  |\n");
    }
}
