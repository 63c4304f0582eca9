//! Parsing and showing the kinds of values settings hold.

use super::*;

pub(super) fn text(raw: &Raw) -> Result<&str, String> {
    match raw {
        Raw::Text(s) => Ok(s),
        Raw::List(_) => Err("got a list".into()),
    }
}

pub(super) fn parse_path(raw: &Raw) -> Result<PathBuf, String> {
    let s = text(raw)?;
    if s.is_empty() {
        return Err("got an empty path".into());
    }
    Ok(PathBuf::from(s))
}

pub(super) fn parse_optional_path(raw: &Raw) -> Result<Option<PathBuf>, String> {
    let s = text(raw)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

pub(super) fn parse_addr(raw: &Raw) -> Result<SocketAddr, String> {
    let s = text(raw)?;
    s.parse().map_err(|_| format!("`{s}` is not an IP:PORT address"))
}

pub(super) fn parse_optional_addr(raw: &Raw) -> Result<Option<SocketAddr>, String> {
    let s = text(raw)?;
    if s.is_empty() { Ok(None) } else { parse_addr(raw).map(Some) }
}

pub(super) fn parse_host_ports(raw: &Raw) -> Result<Vec<String>, String> {
    let items = match raw {
        Raw::List(items) => items.clone(),
        Raw::Text(s) => s.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
    };
    for item in &items {
        let valid = item
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !valid {
            return Err(format!("`{item}` is not HOST:PORT"));
        }
    }
    Ok(items)
}

pub(super) fn parse_dht_mode(raw: &Raw) -> Result<DhtMode, String> {
    match text(raw)? {
        "auto" => Ok(DhtMode::Auto),
        "server" => Ok(DhtMode::Server),
        "client" => Ok(DhtMode::Client),
        other => Err(format!("`{other}` is not a DHT mode")),
    }
}

pub(super) fn parse_bool(raw: &Raw) -> Result<bool, String> {
    match text(raw)? {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("`{other}` is not true or false")),
    }
}

pub(super) const KIB: u64 = 1024;

/// `65536`, `64KiB`, `32MiB` or `1GiB` (binary units only: "KB" would be ambiguous).
pub(super) fn parse_bytes(raw: &Raw) -> Result<u64, String> {
    let s = text(raw)?;
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let multiplier = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => KIB * KIB,
        "GiB" => KIB * KIB * KIB,
        other => return Err(format!("`{other}` is not a unit (use B, KiB, MiB or GiB)")),
    };
    match number.parse::<u64>().ok().and_then(|n| n.checked_mul(multiplier)) {
        Some(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of bytes of at least 1")),
    }
}

/// The largest binary unit that divides `bytes` evenly, as `parse_bytes` reads it.
pub(super) fn show_bytes(bytes: &u64) -> String {
    let text = match *bytes {
        b if b >= KIB * KIB * KIB && b % (KIB * KIB * KIB) == 0 => format!("{}GiB", b / (KIB * KIB * KIB)),
        b if b >= KIB * KIB && b % (KIB * KIB) == 0 => format!("{}MiB", b / (KIB * KIB)),
        b if b >= KIB && b % KIB == 0 => format!("{}KiB", b / KIB),
        b => b.to_string(),
    };
    quote(&text)
}

pub(super) fn parse_count(raw: &Raw) -> Result<u64, String> {
    let s = text(raw)?;
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

pub(super) fn parse_secret(raw: &Raw) -> Result<Option<String>, String> {
    let s = text(raw)?;
    if s.is_empty() {
        return Ok(None);
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token holds spaces or non-ASCII characters".into());
    }
    Ok(Some(s.to_owned()))
}

pub(super) fn parse_log_level(raw: &Raw) -> Result<String, String> {
    let s = text(raw)?;
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("`{s}` is not a log filter ({e})"))?;
    Ok(s.to_owned())
}

/// A duration that drives a timer: at least one second, so a typo cannot flood the network.
pub(super) fn parse_interval(raw: &Raw) -> Result<Duration, String> {
    let interval = parse_duration_raw(raw)?;
    if interval < Duration::from_secs(1) {
        return Err(format!("{} is shorter than one second", format_duration(interval)));
    }
    Ok(interval)
}

pub(super) fn parse_duration_raw(raw: &Raw) -> Result<Duration, String> {
    parse_duration(text(raw)?)
}

/// Parses durations such as `90s`, `15m`, `12h`, `30d`, `500ms`, `1h30m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("`{s}` is not a duration");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        // Whole seconds in u64, as a bare number reads them, so that every duration shown reads back.
        let part = match &rest[..unit_len] {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = part.and_then(|part| total.checked_add(part)).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Reads `data` as a config file is read: TOML, keys flattened and checked, every value resolved and checked
/// as at start-up (no environment, no flags), and each line also as a duration and a byte size. For the fuzz
/// target (`tests/fuzz`) and the randomised tests.
///
/// # Panics
///
/// Only if a duration or byte size that was accepted does not read back from the form it is shown in.
pub fn fuzz_config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for line in text.lines() {
        if let Ok(duration) = parse_duration(line) {
            assert_eq!(
                parse_duration(&format_duration(duration)),
                Ok(duration),
                "{line:?} read back differently"
            );
        }
        if let Ok(bytes) = parse_bytes(&Raw::Text(line.to_owned())) {
            let shown = show_bytes(&bytes);
            let shown = shown.trim_matches('"').to_owned();
            assert_eq!(parse_bytes(&Raw::Text(shown)), Ok(bytes), "{line:?} read back differently");
        }
    }
    let Ok(table) = text.parse::<toml::Table>() else { return };
    let path = Path::new("fuzz.toml");
    let mut file_values = BTreeMap::new();
    if flatten(path, "", &table, &mut file_values).is_err() {
        return;
    }
    let (env, flags) = (Env::default(), FlagValues::default());
    let resolver = Resolver { file: Some(path), file_values, env: &env, flags: &flags, shown: Vec::new() };
    if let Ok((config, shown)) = resolver.resolve() {
        std::hint::black_box((config, shown));
    }
}

/// Formats a duration in the units [`parse_duration`] reads, largest first.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 {
        return format!("{millis}ms");
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if millis > 0 {
        out.push_str(&format!("{millis}ms"));
    }
    out
}

pub(super) fn show_path(p: &Path) -> String {
    quote(&p.display().to_string())
}

pub(super) fn show_addr(a: &SocketAddr) -> String {
    quote(&a.to_string())
}

pub(super) fn show_duration(d: &Duration) -> String {
    quote(&format_duration(*d))
}

/// A TOML basic string.
pub(super) fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
