//! Prints combinations of the simulator's KMCL readings (`kmcl_sim::READINGS`), one
//! `VMBSRV_SIM_READINGS` specification per line, for `scripts/readings-matrix.sh`.
//!
//! * `--pairwise` (default): a covering array — every pair of readings of any two points appears
//!   together in at least one line. Greedy, from a fixed seed, so the list is the same every run.
//! * `--each`: the defaults, then each non-default reading alone.
//! * `--count`: how many combinations the full product would have.

use std::collections::BTreeSet;

use kmcl_sim::READINGS;

/// One combination: the index of the chosen reading of each point.
type Row = Vec<usize>;

fn spec(row: &Row) -> String {
    READINGS
        .iter()
        .zip(row)
        .map(|((point, readings), &k)| format!("{point}={}", readings[k]))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every (point a, reading i, point b, reading j) with a < b.
fn all_pairs() -> BTreeSet<(usize, usize, usize, usize)> {
    let mut pairs = BTreeSet::new();
    for (a, (_, first)) in READINGS.iter().enumerate() {
        for (b, (_, second)) in READINGS.iter().enumerate().skip(a + 1) {
            for i in 0..first.len() {
                for j in 0..second.len() {
                    pairs.insert((a, i, b, j));
                }
            }
        }
    }
    pairs
}

fn covered(row: &Row, pairs: &BTreeSet<(usize, usize, usize, usize)>) -> usize {
    let mut n = 0;
    for a in 0..row.len() {
        for b in a + 1..row.len() {
            n += usize::from(pairs.contains(&(a, row[a], b, row[b])));
        }
    }
    n
}

/// A small xorshift generator: the candidate rows are the same on every run.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn pairwise() -> Vec<Row> {
    let mut uncovered = all_pairs();
    let mut rows = vec![vec![0; READINGS.len()]];
    for pair in pairs_of(&rows[0]) {
        uncovered.remove(&pair);
    }
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    while !uncovered.is_empty() {
        // Seed the row with one uncovered pair, fill the rest greedily from random candidates.
        let &(a, i, b, j) = uncovered.iter().next().unwrap_or(&(0, 0, 1, 0));
        let mut best: Option<(usize, Row)> = None;
        for _ in 0..400 {
            let mut row: Row = READINGS.iter().map(|(_, r)| rng.below(r.len())).collect();
            row[a] = i;
            row[b] = j;
            let score = covered(&row, &uncovered);
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, row));
            }
        }
        let Some((_, row)) = best else { break };
        for pair in pairs_of(&row) {
            uncovered.remove(&pair);
        }
        rows.push(row);
    }
    rows
}

fn pairs_of(row: &Row) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    for a in 0..row.len() {
        for b in a + 1..row.len() {
            out.push((a, row[a], b, row[b]));
        }
    }
    out
}

fn each() -> Vec<Row> {
    let mut rows = vec![vec![0; READINGS.len()]];
    for (point, (_, readings)) in READINGS.iter().enumerate() {
        for k in 1..readings.len() {
            let mut row = vec![0; READINGS.len()];
            row[point] = k;
            rows.push(row);
        }
    }
    rows
}

fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "--pairwise".into());
    let rows = match mode.as_str() {
        "--pairwise" => pairwise(),
        "--each" => each(),
        "--count" => {
            let product: usize = READINGS.iter().map(|(_, r)| r.len()).product();
            println!("{product}");
            return;
        }
        other => {
            eprintln!("usage: readings_matrix [--pairwise | --each | --count] (got {other})");
            std::process::exit(2);
        }
    };
    for row in &rows {
        println!("{}", spec(row));
    }
}
