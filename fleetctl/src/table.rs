//! Tab-aligned columns exactly as Go's `text/tabwriter` printed fleetctl's tables
//! (minwidth 0, tabwidth 8, padding 1, padding character TAB, no flags).
//!
//! Input is text whose cells end with `\t` and whose lines end with `\n`. A column block is a
//! run of consecutive lines that all have a tab-terminated cell in that column; every cell of
//! a block is padded with tabs to the block's width (widest cell + 1, rounded up to a multiple
//! of 8). The last cell of a line is never padded.

const TAB_WIDTH: usize = 8;
const PADDING: usize = 1;
const MIN_WIDTH: usize = 0;

/// Aligns `text` as Go's tabwriter would.
pub fn align(text: &str) -> String {
    let lines: Vec<Vec<&str>> = text.split('\n').map(|l| l.split('\t').collect()).collect();
    let mut out = String::with_capacity(text.len() * 2);
    let mut widths = Vec::new();
    format(&lines, &mut widths, 0, lines.len(), &mut out);
    out
}

/// Renders rows of cells (one line each, cells separated by tabs) and aligns them.
pub fn render(rows: &[Vec<String>]) -> String {
    let mut text = String::new();
    for row in rows {
        text.push_str(&row.join("\t"));
        text.push('\n');
    }
    align(&text)
}

fn cell_width(cell: &str) -> usize {
    cell.chars().count()
}

/// Formats lines `line0..line1` knowing the widths of the columns left of `widths.len()`.
fn format(
    lines: &[Vec<&str>],
    widths: &mut Vec<usize>,
    mut line0: usize,
    line1: usize,
    out: &mut String,
) {
    let column = widths.len();
    let mut this = line0;
    while this < line1 {
        if column + 1 >= lines[this].len() {
            this += 1;
            continue;
        }
        // a block of lines with a cell in this column starts here
        write_lines(lines, widths, line0, this, out);
        line0 = this;
        let mut width = MIN_WIDTH;
        while this < line1 && column + 1 < lines[this].len() {
            width = width.max(cell_width(lines[this][column]) + PADDING);
            this += 1;
        }
        widths.push(width);
        format(lines, widths, line0, this, out);
        widths.pop();
        line0 = this;
    }
    write_lines(lines, widths, line0, line1, out);
}

fn write_lines(
    lines: &[Vec<&str>],
    widths: &[usize],
    line0: usize,
    line1: usize,
    out: &mut String,
) {
    for (i, line) in lines.iter().enumerate().take(line1).skip(line0) {
        for (j, cell) in line.iter().enumerate() {
            out.push_str(cell);
            if let Some(&w) = widths.get(j) {
                pad(out, cell_width(cell), w);
            }
        }
        // the text after the last newline is a partial line: no newline of its own
        if i + 1 < lines.len() {
            out.push('\n');
        }
    }
}

fn pad(out: &mut String, text_width: usize, cell_width: usize) {
    let cell_width = cell_width.div_ceil(TAB_WIDTH) * TAB_WIDTH;
    let n = cell_width.saturating_sub(text_width);
    for _ in 0..n.div_ceil(TAB_WIDTH) {
        out.push('\t');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, want: &str) {
        assert_eq!(align(input), want, "input {input:?}");
    }

    #[test]
    fn matches_go_tabwriter() {
        // expected outputs worked out with Go's algorithm (minwidth 0, tabwidth 8, padding 1,
        // padchar '\t')
        check("", "");
        check("a\n", "a\n");
        check("a\tb\n", "a\tb\n");
        check(
            "UNIT\tHASH\tDSTATE\tSTATE\tTARGET\nhello.service\te55c0ae\tinactive\tinactive\t-\n",
            "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\nhello.service\te55c0ae\tinactive\tinactive\t-\n",
        );
        // a cell of exactly 7 characters needs one tab, of 8 characters two
        check("1234567\tx\n12345678\ty\n", "1234567\t\tx\n12345678\ty\n");
        check("1234567\tx\n", "1234567\tx\n");
        check("12345678\tx\n", "12345678\tx\n");
        // empty cells are padded too
        check("\tx\nabc\ty\n", "\tx\nabc\ty\n");
        // a line without tabs ends the column block
        check(
            "aaaaaaaaaaaa\tb\nplain\nc\td\n",
            "aaaaaaaaaaaa\tb\nplain\nc\td\n",
        );
        check("aaaaaaaaaaaa\tb\nc\td\n", "aaaaaaaaaaaa\tb\nc\t\td\n");
        // columns are measured in characters, not bytes
        check("äääääää\tx\nb\ty\n", "äääääää\tx\nb\ty\n");
        // a partial last line keeps no newline
        check("a\tb\nc\td", "a\tb\nc\td");
    }

    #[test]
    fn render_joins_cells() {
        let rows = vec![
            vec![
                "MACHINE".to_string(),
                "IP".to_string(),
                "METADATA".to_string(),
            ],
            vec![
                "113f16a7...".to_string(),
                "172.17.8.103".to_string(),
                "-".to_string(),
            ],
        ];
        assert_eq!(
            render(&rows),
            "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t172.17.8.103\t-\n"
        );
    }
}
