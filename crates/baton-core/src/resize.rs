//! A change of a key's limit: to a number (`baton resize KEY 4`) or by a step
//! (`baton resize KEY +1`, `-1`).
//!
//! Guarantees: every store applies a change with [`Resize::apply`] to the limit it reads
//! in the same atomic step as its write (a transaction, a script, or a compare-and-set
//! retried on conflict), so two relative changes at once both count. A limit stays
//! between 1 and the store's maximum: a step that would leave it outside is refused,
//! naming the current limit, and changes nothing. Lowering never evicts a holder.

use std::fmt;
use std::str::FromStr;

use crate::kit::errors::check_limit;
use crate::{Error, ErrorKind, Result};

/// A change of a key's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Set the limit to this many slots.
    To(u32),
    /// Raise (positive) or lower (negative) the limit by this many slots.
    By(i64),
}

impl Resize {
    /// The limit this change makes of a key whose limit is `current`, in a store whose
    /// limits go up to `max`.
    pub fn apply(self, current: u32, max: u32) -> Result<u32> {
        match self {
            Resize::To(n) => check_limit(n, max).map(|()| n),
            Resize::By(step) => {
                let new = i64::from(current).saturating_add(step);
                if new < 1 {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "the key has a limit of {current} slot(s); lowering it by {} would \
                             leave {new}, and a limit is at least 1 slot (the limit is unchanged)",
                            step.unsigned_abs()
                        ),
                    )
                    .with_current_limit(current));
                }
                if new > i64::from(max) {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "the key has a limit of {current} slot(s); raising it by {step} \
                             would make {new}, and this store allows at most {max} (the limit \
                             is unchanged)"
                        ),
                    )
                    .with_current_limit(current));
                }
                Ok(u32::try_from(new).unwrap_or(max))
            }
        }
    }

    /// Whether the result depends on the current limit (a store may skip reading it for
    /// an absolute change).
    pub fn is_relative(self) -> bool {
        matches!(self, Resize::By(_))
    }
}

impl From<u32> for Resize {
    fn from(limit: u32) -> Resize {
        Resize::To(limit)
    }
}

impl fmt::Display for Resize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resize::To(n) => write!(f, "{n}"),
            Resize::By(step) => write!(f, "{step:+}"),
        }
    }
}

impl FromStr for Resize {
    type Err = Error;

    /// `4` sets the limit; `+2` and `-1` change it by a step.
    fn from_str(s: &str) -> Result<Resize> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "'{s}' is not a limit: {why} (use N to set it, +N or -N to change it by N)"
                ),
            )
        };
        let t = s.trim();
        let (sign, digits) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => (0, t),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("expected a whole number"));
        }
        if sign == 0 {
            let n: u32 = digits.parse().map_err(|_| bad("too large"))?;
            if n == 0 {
                return Err(bad("a limit is at least 1 slot"));
            }
            return Ok(Resize::To(n));
        }
        let n: i64 = digits.parse().map_err(|_| bad("too large"))?;
        if n == 0 {
            return Err(bad("a step of 0 changes nothing"));
        }
        Ok(Resize::By(sign * n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_and_relative() {
        assert_eq!("4".parse::<Resize>().expect("accepted"), Resize::To(4));
        assert_eq!("+2".parse::<Resize>().expect("accepted"), Resize::By(2));
        assert_eq!("-1".parse::<Resize>().expect("accepted"), Resize::By(-1));
        for bad in [
            "",
            "0",
            "+0",
            "-",
            "+",
            "1.5",
            "x",
            "+-1",
            "99999999999",
            "- 1",
        ] {
            let e = bad.parse::<Resize>().expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains("+N or -N"), "{bad}: {e}");
        }
    }

    #[test]
    fn applies_within_bounds_or_refuses() {
        assert_eq!(Resize::To(3).apply(1, 10).expect("accepted"), 3);
        assert_eq!(Resize::By(2).apply(1, 10).expect("accepted"), 3);
        assert_eq!(Resize::By(-2).apply(3, 10).expect("accepted"), 1);
        let e = Resize::By(-3).apply(3, 10).expect_err("refused");
        assert!(e.to_string().contains("at least 1"), "{e}");
        assert_eq!(e.current_limit(), Some(3));
        assert!(Resize::By(8).apply(3, 10).is_err());
        assert!(Resize::By(i64::MAX).apply(3, 10).is_err());
        assert!(Resize::By(i64::MIN).apply(3, 10).is_err());
        assert!(Resize::To(0).apply(3, 10).is_err());
        assert!(Resize::To(11).apply(3, 10).is_err());
        assert_eq!(Resize::By(-1).to_string(), "-1");
        assert_eq!(Resize::By(1).to_string(), "+1");
    }
}
