//! The routing suite's flags and the checked plan they resolve to, kept apart from
//! the measuring so every limit is enforced before anything runs.

use super::{IDS_MIN, LANES_MAX};
use crate::error::{check_list, check_range, ArgError};
use crate::hashes::HashFn;
use crate::ids::{IdFamily, FAMILY_IDS_MAX};
use serde::Serialize;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct RoutingArgs {
    /// Tiny sizes (10k ids; 16 and 64 lanes): a smoke run in well under 10 s.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub output: crate::report::OutputArgs,
    /// Id-set sizes [default: 100000,1000000; quick: 10000].
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<u64>>,
    /// Lane counts [default: 16,64,1024; quick: 16,64].
    #[arg(long, value_delimiter = ',')]
    pub lanes: Option<Vec<u64>>,
    /// Id families [default: all].
    #[arg(long, value_delimiter = ',')]
    pub families: Option<Vec<IdFamily>>,
    /// Hash functions [default: all].
    #[arg(long, value_delimiter = ',')]
    pub hashes: Option<Vec<HashFn>>,
    /// Lane count before growth for the rebalance table (grows to N+1) [default: 16].
    #[arg(long)]
    pub grow_from: Option<u64>,
    /// Seed for the random id families.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip the search for the write-up's "FNV max bucket 112".
    #[arg(long)]
    pub no_writeup: bool,
}

/// The resolved plan: flags with `--quick` and defaults applied, all checked.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingPlan {
    pub quick: bool,
    pub ids: Vec<u64>,
    pub lanes: Vec<u64>,
    pub families: Vec<IdFamily>,
    pub hashes: Vec<HashFn>,
    pub grow_from: u64,
    pub seed: u64,
    pub writeup: bool,
}

impl RoutingArgs {
    pub fn plan(&self) -> Result<RoutingPlan, ArgError> {
        let q = self.quick;
        let ids = self.ids.clone().unwrap_or_else(|| {
            if q {
                vec![10_000]
            } else {
                vec![100_000, 1_000_000]
            }
        });
        let lanes =
            self.lanes
                .clone()
                .unwrap_or_else(|| if q { vec![16, 64] } else { vec![16, 64, 1024] });
        check_list("ids", &ids, IDS_MIN, FAMILY_IDS_MAX)?;
        check_list("lanes", &lanes, 1, LANES_MAX)?;
        let grow_from = self.grow_from.unwrap_or(16);
        check_range("grow-from", grow_from, 1, LANES_MAX - 1)?;
        let families = self
            .families
            .clone()
            .unwrap_or_else(|| IdFamily::ALL.to_vec());
        let hashes = self.hashes.clone().unwrap_or_else(|| HashFn::ALL.to_vec());
        if families.is_empty() {
            return Err(ArgError::Empty { flag: "families" });
        }
        if hashes.is_empty() {
            return Err(ArgError::Empty { flag: "hashes" });
        }
        Ok(RoutingPlan {
            quick: q,
            ids,
            lanes,
            families,
            hashes,
            grow_from,
            seed: self.seed,
            writeup: !self.no_writeup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plan_is_small_and_limits_are_enforced() {
        let p = RoutingArgs {
            quick: true,
            ..Default::default()
        }
        .plan()
        .unwrap();
        assert_eq!(p.ids, vec![10_000]);
        let bad = RoutingArgs {
            lanes: Some(vec![0]),
            ..Default::default()
        }
        .plan();
        assert!(matches!(
            bad,
            Err(ArgError::OutOfRange { flag: "lanes", .. })
        ));
    }
}
