//! Reading counters out of Prometheus text exposition format.

/// The value of counter `name` whose labels include every pair in `labels`,
/// summed over all matching series (so extra labels the relay may add, like a
/// region, do not matter). An absent counter reads as `0`.
///
/// ```
/// let text = "# TYPE c counter\nc{reason=\"malformed\"} 3\nc{reason=\"unknown_id\"} 1\n";
/// assert_eq!(relay_tests::counter_value(text, "c", &[("reason", "malformed")]), 3.0);
/// assert_eq!(relay_tests::counter_value(text, "c", &[("reason", "unknown_type")]), 0.0);
/// ```
pub fn counter_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|sample| sample.value)
        .sum()
}

/// One parsed sample line.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses `name{k="v",..} value [timestamp]` or `name value [timestamp]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (&line[..=close], &line[close + 1..])
        }
        None => {
            let space = line.find(char::is_whitespace)?;
            (&line[..space], &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    let (name, labels) = match series.find('{') {
        Some(open) => (
            &series[..open],
            parse_labels(&series[open + 1..series.len() - 1]),
        ),
        None => (series, Vec::new()),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"` (label values in the tests never contain quotes).
fn parse_labels(inner: &str) -> Vec<(String, String)> {
    inner
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        })
        .collect()
}
