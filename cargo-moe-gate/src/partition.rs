//! Sharding a gate run across CI jobs (docs/gate.md): `--partition K/N` keeps the trials of every N-th prompt
//! of the contract as resolved for the model in use (after `only_on` filtering, in contract order),
//! starting with the K-th: prompt `i` (from 0) belongs to partition `(i mod N) + 1`. Dealing prompts out
//! by index keeps every shard's share within one prompt of the others, and each (run, prompt) forward
//! runs in exactly one shard. `cargo moe-gate merge` ([`crate::merge`]) joins the shards' reports.

use std::fmt;
use std::str::FromStr;

use moe_contracts::{Prompt, TrialPlan};

use crate::report::PartitionInfo;

/// The accepted form, quoted by every syntax error.
pub const PARTITION_FORM: &str = "K/N with whole numbers 1 <= K <= N, e.g. `--partition 2/3`";

/// One shard of a gate run: partition `index` of `count`, both from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Which shard, 1..=count.
    pub index: usize,
    /// How many shards.
    pub count: usize,
}

/// A `--partition` value that is not `K/N` with `1 <= K <= N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}`: {problem}; the accepted form is {PARTITION_FORM}")]
pub struct PartitionSyntaxError {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl FromStr for Partition {
    type Err = PartitionSyntaxError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = |problem| PartitionSyntaxError { value: value.to_string(), problem };
        let (k, n) = value.split_once('/').ok_or_else(|| error("there is no `/`"))?;
        let number = |s: &str| s.trim().parse::<usize>().ok();
        let (Some(index), Some(count)) = (number(k), number(n)) else {
            return Err(error("K and N must be whole numbers"));
        };
        if count == 0 {
            return Err(error("N must be at least 1"));
        }
        if index == 0 {
            return Err(error("K must be at least 1 (partitions count from 1)"));
        }
        if index > count {
            return Err(error("K must not exceed N"));
        }
        Ok(Partition { index, count })
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Partition {
    /// Whether the prompt at `position` (from 0, in the resolved contract's order) belongs to this
    /// partition; a trial without a prompt (`None`) belongs to partition 1.
    pub fn owns(&self, position: Option<usize>) -> bool {
        match position {
            Some(i) => i % self.count == self.index - 1,
            None => self.index == 1,
        }
    }

    /// The prompts of this partition, in contract order.
    pub fn prompts(&self, prompts: &[Prompt]) -> Vec<Prompt> {
        prompts.iter().enumerate().filter(|(i, _)| self.owns(Some(*i))).map(|(_, p)| p.clone()).collect()
    }

    /// Removes the trials of prompts outside this partition, the way a name filter would remove them
    /// before anything runs (they are neither forwarded, listed, counted nor reported).
    pub fn retain_trials(&self, plans: &mut Vec<TrialPlan>, prompts: &[Prompt]) {
        plans.retain(|plan| self.owns(prompts.iter().position(|p| p.id == plan.prompt)));
    }

    /// What the report records: this partition's prompts out of all of them.
    pub fn info(&self, prompts: &[Prompt]) -> PartitionInfo {
        PartitionInfo {
            index: self.index,
            count: self.count,
            prompts: self.prompts(prompts).into_iter().map(|p| p.id).collect(),
            total_prompts: prompts.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(n: usize) -> Vec<Prompt> {
        (0..n).map(|i| Prompt { id: format!("p{i}"), tokens: vec![i as u32] }).collect()
    }

    fn plan(prompt: &str) -> TrialPlan {
        TrialPlan {
            name: format!("c::K::{prompt}"),
            criterion: "K".into(),
            prompt: prompt.into(),
            layer: None,
            position: None,
            runs: vec!["cpu".into(), "reference".into()],
            expected: None,
        }
    }

    #[test]
    fn accepted_form_parses() {
        assert_eq!("2/3".parse(), Ok(Partition { index: 2, count: 3 }));
        assert_eq!("1/1".parse(), Ok(Partition { index: 1, count: 1 }));
        assert_eq!("3/3".parse::<Partition>().unwrap().to_string(), "3/3");
    }

    #[test]
    fn bad_syntax_says_the_accepted_form() {
        for (value, problem) in [
            ("0/3", "K must be at least 1"),
            ("4/3", "K must not exceed N"),
            ("a/b", "whole numbers"),
            ("3", "no `/`"),
            ("1/0", "N must be at least 1"),
            ("-1/3", "whole numbers"),
            ("", "no `/`"),
        ] {
            let e = value.parse::<Partition>().unwrap_err().to_string();
            assert!(e.contains(problem) && e.contains("the accepted form is K/N"), "{value}: {e}");
        }
    }

    #[test]
    fn prompts_are_dealt_out_by_index() {
        let all = prompts(7);
        let ids = |k: usize| -> Vec<String> {
            Partition { index: k, count: 3 }.prompts(&all).into_iter().map(|p| p.id).collect()
        };
        assert_eq!(ids(1), ["p0", "p3", "p6"]);
        assert_eq!(ids(2), ["p1", "p4"]);
        assert_eq!(ids(3), ["p2", "p5"]);
        let info = Partition { index: 2, count: 3 }.info(&all);
        assert_eq!((info.prompts.len(), info.total_prompts), (2, 7));
        assert_eq!(info.to_string(), "partition 2/3: 2 of 7 prompts");
    }

    #[test]
    fn every_trial_lands_in_exactly_one_partition() {
        let all = prompts(5);
        let plans: Vec<TrialPlan> = ["p0", "p1", "p2", "p3", "p4", "p2", "gone"].map(plan).to_vec();
        let mut seen = Vec::new();
        for index in 1..=2 {
            let mut mine = plans.clone();
            Partition { index, count: 2 }.retain_trials(&mut mine, &all);
            seen.extend(mine.into_iter().map(|p| (index, p.prompt)));
        }
        let partition_of = |prompt: &str| -> Vec<usize> {
            seen.iter().filter(|(_, p)| p == prompt).map(|(k, _)| *k).collect()
        };
        assert_eq!(partition_of("p0"), [1]);
        assert_eq!(partition_of("p1"), [2]);
        assert_eq!(partition_of("p2"), [1, 1], "both trials of p2, in partition 1");
        assert_eq!(partition_of("p4"), [1]);
        assert_eq!(partition_of("gone"), [1], "a trial without a known prompt goes to partition 1");
        assert_eq!(seen.len(), plans.len());
    }
}
