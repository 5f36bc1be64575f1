//! `--prefill 1,64,512`: the list of token counts `bench` measures, as a command-line value type.

use std::fmt;
use std::str::FromStr;

/// A comma-separated list of token counts, each at least 1 (`--prefill 1,64,512`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lengths(pub Vec<usize>);

/// A `--prefill` value that is not a comma-separated list of token counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}`: {problem}; give comma-separated token counts of at least 1, e.g. 1,64,512")]
pub struct LengthsSyntaxError {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for Lengths {
    type Err = LengthsSyntaxError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = |problem: String| LengthsSyntaxError { value: value.to_string(), problem };
        if value.trim().is_empty() {
            return Err(error("the list is empty".to_string()));
        }
        let lengths = value
            .split(',')
            .map(|item| match item.trim().parse::<usize>() {
                Ok(0) => Err(error("a prefill of 0 tokens measures nothing".to_string())),
                Ok(n) => Ok(n),
                Err(_) if item.trim().is_empty() => Err(error("an item is empty".to_string())),
                Err(_) => Err(error(format!("`{}` is not a whole number", item.trim()))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Lengths(lengths))
    }
}

impl fmt::Display for Lengths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_comma_separated_counts() {
        assert_eq!("1,64,512".parse::<Lengths>().unwrap(), Lengths(vec![1, 64, 512]));
        assert_eq!(" 7 , 3 ".parse::<Lengths>().unwrap(), Lengths(vec![7, 3]));
        assert_eq!(Lengths(vec![1, 64, 512]).to_string(), "1,64,512");
    }

    #[test]
    fn bad_lengths_say_what_is_wrong() {
        let problem = |s: &str| s.parse::<Lengths>().unwrap_err().problem;
        assert_eq!(problem("1,64,x"), "`x` is not a whole number");
        assert_eq!(problem("1,-2"), "`-2` is not a whole number");
        assert_eq!(problem("1,,2"), "an item is empty");
        assert_eq!(problem(" "), "the list is empty");
        assert_eq!(problem("1,0"), "a prefill of 0 tokens measures nothing");
        let e = "1,64,x".parse::<Lengths>().unwrap_err().to_string();
        assert!(e.starts_with("`1,64,x`: ") && e.ends_with("e.g. 1,64,512"), "{e}");
    }
}
