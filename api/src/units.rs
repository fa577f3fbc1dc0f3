//! Sizes written the way operators write them: `10`, `10G`, `10GiB`, `512MiB`.
//!
//! A bare number is bytes. Suffixes K/M/G/T/P (with or without `i` and `B`) are powers of 1024,
//! as in pxctl and Kubernetes' binary units; `KB`/`MB`/... (decimal) are powers of 1000.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} is negative; sizes must be positive")]
    Negative(String),
    #[error("size {0:?} is not a number with an optional unit (examples: 10, 10G, 10GiB, 512MiB)")]
    NotANumber(String),
    #[error("size {0:?} has an unknown unit (use K, M, G, T, P, KiB, MiB, GiB, TiB, PiB, KB, MB, GB, TB)")]
    UnknownUnit(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size such as `10`, `10G`, `10GiB`, `1.5GiB`, `100MB` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if s.starts_with('-') {
        return Err(SizeError::Negative(input.to_string()));
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.chars().filter(|c| *c == '.').count() > 1 || num == "." {
        return Err(SizeError::NotANumber(input.to_string()));
    }
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "Ki" | "KiB" | "kiB" => 1 << 10,
        "M" | "m" | "Mi" | "MiB" => 1 << 20,
        "G" | "g" | "Gi" | "GiB" => 1 << 30,
        "T" | "t" | "Ti" | "TiB" => 1 << 40,
        "P" | "p" | "Pi" | "PiB" => 1 << 50,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(SizeError::UnknownUnit(input.to_string())),
    };
    if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| SizeError::Overflow(input.to_string()))? };
        let frac_digits = frac.len().min(9) as u32;
        let frac_val: u64 =
            if frac.is_empty() { 0 } else { frac[..frac_digits as usize].parse().map_err(|_| SizeError::NotANumber(input.to_string()))? };
        let whole = int.checked_mul(mult).ok_or_else(|| SizeError::Overflow(input.to_string()))?;
        let part = (frac_val as u128 * mult as u128 / 10u128.pow(frac_digits)) as u64;
        whole.checked_add(part).ok_or_else(|| SizeError::Overflow(input.to_string()))
    } else {
        let n: u64 = num.parse().map_err(|_| SizeError::Overflow(input.to_string()))?;
        n.checked_mul(mult).ok_or_else(|| SizeError::Overflow(input.to_string()))
    }
}

/// Formats bytes with a binary unit, e.g. `10 GiB`, `1.5 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[i])
    } else {
        format!("{:.2} {}", v, UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("10"), Ok(10));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10Gi"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size(" 4k "), Ok(4096));
    }

    #[test]
    fn rejects_bad_sizes_with_a_reason() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Negative(_))));
        assert!(matches!(parse_size("abc"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("1.2.3G"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("10X"), Err(SizeError::UnknownUnit(_))));
        assert!(matches!(parse_size("99999999999P"), Err(SizeError::Overflow(_))));
        assert!(parse_size("-1").unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
