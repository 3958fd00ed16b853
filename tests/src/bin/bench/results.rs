//! The suite's common result structure: every part adds [`Record`]s (one figure, its
//! samples round by round) to a [`Results`]; ratios of ours over each peer are taken
//! from it pair by pair, and the report (`report`) is written from it alone.
//!
//! A part is anything that implements [`Part`]: it gets the suite's [`Context`] (the
//! loaded datapath, the progress bar, the results) and adds records. Parts that need
//! no datapath (the control plane's) ignore the lab. Adding one: `impl Part`, and an
//! arm naming it in `main`'s list of parts (its settings from `Args` and the mode);
//! its records then appear in `results.json`, the summary and the HTML report like
//! every other part's, with ratios wherever it records `ours` beside a peer.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{progress::Progress, Lab};

/// Which way a metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Better {
    Higher,
    Lower,
}

/// One figure: a system's metric in one case, one sample per round. Records of the same
/// `part`, `scenario`, `case` and `metric` but different `system` were measured on the
/// same topology and traffic, round by round interleaved, so sample `i` of each belongs
/// together.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The part that measured it (`testrun`, `l2`, `security-groups`, ...).
    pub part: String,
    /// What is compared, e.g. "L2 switching, real traffic".
    pub scenario: String,
    /// The case within the scenario, e.g. "64 B IPv4, 1 flow".
    pub case: String,
    /// `ours`, a peer's name, or `floor`.
    pub system: String,
    /// The swept parameter and its value, for cost-growth plots (`rules`, `flows`,
    /// `floating IPs`, `bytes`).
    pub sweep: Option<(String, f64)>,
    /// The case's traffic variant when it has several (`unreplied`, `established`).
    pub variant: Option<String>,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The sanity checks this figure passed (a figure whose check fails is not
    /// recorded: the run stops).
    pub checks: Vec<String>,
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        part: &str,
        scenario: &str,
        case: &str,
        system: &str,
        metric: &str,
        unit: &str,
        better: Better,
        samples: Vec<f64>,
    ) -> Self {
        let (median, min, max) = crate::median(&samples);
        Self {
            part: part.into(),
            scenario: scenario.into(),
            case: case.into(),
            system: system.into(),
            sweep: None,
            variant: None,
            metric: metric.into(),
            unit: unit.into(),
            better,
            samples,
            median,
            min,
            max,
            checks: vec![],
        }
    }

    pub fn sweep(mut self, name: &str, value: f64) -> Self {
        self.sweep = Some((name.into(), value));
        self
    }

    pub fn variant(mut self, variant: &str) -> Self {
        self.variant = Some(variant.into());
        self
    }

    pub fn checks(mut self, checks: &[&str]) -> Self {
        self.checks = checks.iter().map(|c| (*c).to_owned()).collect();
        self
    }
}

/// Ours over one peer in one case: per round the ratio of the same round's figures,
/// oriented so that above 1 means ours is better (pps: ours / peer; costs and
/// latencies: peer / ours), then the median and spread of those ratios.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ratio {
    pub part: String,
    pub scenario: String,
    /// The case and its variant, if any.
    pub case: String,
    pub metric: String,
    pub peer: String,
    pub per_round: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// What the figures were measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environment {
    pub machine: String,
    pub cpus: usize,
    pub kernel: String,
    pub commit: String,
    pub started: String,
    pub mode: String,
    pub command: String,
    pub generator: String,
    pub cpu_cost: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub environment: Environment,
    pub records: Vec<Record>,
    pub ratios: Vec<Ratio>,
}

impl Results {
    pub fn new(environment: Environment) -> Self {
        Self {
            environment,
            records: vec![],
            ratios: vec![],
        }
    }

    pub fn add(&mut self, record: Record) {
        self.records.push(record);
    }

    /// Ours over every peer measured beside it, pair by pair (not of shares such as
    /// drop ratios, whose quotient says little).
    pub fn compute_ratios(&mut self) {
        let mut ratios = vec![];
        for ours in self
            .records
            .iter()
            .filter(|r| r.system == "ours" && r.unit != "share")
        {
            for peer in self.records.iter().filter(|r| {
                r.system != "ours"
                    && r.system != "floor"
                    && r.part == ours.part
                    && r.scenario == ours.scenario
                    && r.case == ours.case
                    && r.variant == ours.variant
                    && r.metric == ours.metric
            }) {
                let per_round: Vec<f64> = ours
                    .samples
                    .iter()
                    .zip(&peer.samples)
                    .map(|(o, p)| match ours.better {
                        Better::Higher => o / p,
                        Better::Lower => p / o,
                    })
                    .filter(|r| r.is_finite())
                    .collect();
                if per_round.is_empty() {
                    continue;
                }
                let (median, min, max) = crate::median(&per_round);
                ratios.push(Ratio {
                    part: ours.part.clone(),
                    scenario: ours.scenario.clone(),
                    case: match &ours.variant {
                        Some(v) => format!("{}, {v}", ours.case),
                        None => ours.case.clone(),
                    },
                    metric: ours.metric.clone(),
                    peer: peer.system.clone(),
                    per_round,
                    median,
                    min,
                    max,
                });
            }
        }
        self.ratios = ratios;
    }

    /// Records grouped by (part, scenario), in the order they were added.
    pub fn scenarios(&self) -> Vec<((String, String), Vec<&Record>)> {
        let mut order: Vec<(String, String)> = vec![];
        let mut groups: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
        for r in &self.records {
            let key = (r.part.clone(), r.scenario.clone());
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(r);
        }
        order
            .into_iter()
            .map(|key| {
                let records = groups.remove(&key).unwrap_or_default();
                (key, records)
            })
            .collect()
    }
}

/// How much a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Quick,
    Full,
}

/// What a part gets to run with.
pub struct Context<'a> {
    pub lab: &'a mut Lab,
    pub progress: &'a Progress,
    pub results: &'a mut Results,
}

/// One part of the suite.
pub trait Part {
    /// Its name for `--parts`.
    fn name(&self) -> &'static str;
    /// Measurements it will make, for the progress bar.
    fn steps(&self) -> u64;
    /// Measures, adding records to `ctx.results` and advancing `ctx.progress` by one
    /// per measurement.
    fn run(&mut self, ctx: &mut Context<'_>) -> Result<()>;
}
