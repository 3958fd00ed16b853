//! Running frames through the port programs with BPF_PROG_TEST_RUN.
//!
//! [`Harness::load`] loads the agent's embedded object with `TRACE_VERDICT = 1`, so
//! every run leaves its [`Verdict`] in the `VERDICT` map, and loads (does not attach)
//! the classifiers. Tests fill the maps with ABI types, run frames and read back the
//! return code, the verdict, the `skb->mark` the program left, and the counters.
//!
//! The kernel resolves `__sk_buff.ifindex` and `bpf_clone_redirect` targets in the
//! network namespace of the thread that calls BPF_PROG_TEST_RUN: call [`Harness::run`]
//! and friends from [`crate::netns::NetNs::run`] when frames name real devices.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, MapData, PerCpuArray, PerCpuValues,
    },
    programs::{tc::TcAttachType, SchedClassifier, TestRun, TestRunOptions},
    util::nr_cpus,
    Ebpf, EbpfLoader, Pod,
};
use dataplane_abi::{
    global_names, map_names, program_names, verdict_action, DropReason, FdbEntry, FdbKey,
    FloodEntry, FloodSet, PortAddr4, PortAddr6, PortInfo, PortMacKey, PortStats, Verdict,
    MAX_FLOOD_PORTS, PORT_ADDR_FIXED_BITS,
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::frames::Mac;

/// `TC_ACT_*` return codes.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// `sizeof(struct __sk_buff)` and the offsets of the fields a test run may set.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK: usize = 8;
const SKB_IFINDEX: usize = 40;

/// Size of every resizable map in a harness: ample for tests, and fast to create.
pub const TEST_MAX_ENTRIES: u32 = 1024;

/// What one run of a program did.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The program's return code (`TC_ACT_*`).
    pub ret: i32,
    /// The verdict the run traced.
    pub verdict: Verdict,
    /// `skb->mark` after the run.
    pub mark: u32,
}

impl Outcome {
    /// The drop reason, if the frame was dropped.
    pub fn drop_reason(&self) -> Option<DropReason> {
        (self.verdict.action == verdict_action::DROP)
            .then(|| DropReason::from_u32(self.verdict.reason))
            .flatten()
    }

    /// The ifindexes the frame went to, for a unicast or flood verdict.
    pub fn targets(&self) -> &[u32] {
        match self.verdict.action {
            verdict_action::UNICAST | verdict_action::FLOOD => {
                &self.verdict.ifindexes[..(self.verdict.count as usize).min(MAX_FLOOD_PORTS)]
            }
            _ => &[],
        }
    }
}

/// A loaded object with its port programs, ready for test runs.
pub struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    /// Loads `dataplane_agent::kernel::BPF_OBJECT` with verdict tracing on and maps of
    /// [`TEST_MAX_ENTRIES`], and the port programs.
    pub fn load() -> Result<Harness> {
        Harness::load_with_trace(true)
    }

    /// As [`Harness::load`]; `trace: false` loads the programs as production does
    /// (verdicts are then not written): for measurements.
    pub fn load_with_trace(trace: bool) -> Result<Harness> {
        let trace = u32::from(trace);
        let mut loader = EbpfLoader::new();
        loader.override_global(global_names::TRACE_VERDICT, &trace, true);
        for name in [
            map_names::PORTS,
            map_names::PORT_MACS,
            map_names::PORT_IP4,
            map_names::PORT_NET4,
            map_names::PORT_IP6,
            map_names::PORT_NET6,
            map_names::FDB,
            map_names::FLOOD,
            map_names::PORT_STATS,
        ] {
            loader.map_max_entries(name, TEST_MAX_ENTRIES);
        }
        let ebpf = loader
            .load(dataplane_agent::kernel::BPF_OBJECT)
            .context("loading the BPF object")?;
        Harness::from_ebpf(ebpf)
    }

    /// Wraps an object loaded some other way (it must have `TRACE_VERDICT = 1` for
    /// verdicts to mean anything) and loads its port programs.
    pub fn from_ebpf(mut ebpf: Ebpf) -> Result<Harness> {
        for name in [
            program_names::PORT_INGRESS,
            program_names::PORT_EGRESS,
            program_names::NOOP_TC,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            // `{:#}` of the error shows the verifier log.
            prog.load()
                .map_err(|e| anyhow::anyhow!("loading {name}: {e:#}"))?;
        }
        Ok(Harness { ebpf })
    }

    /// Attaches the classifier `program` to `iface` (tcx where the kernel has it), for
    /// tests that send real frames. Call from the namespace of `iface`; the link goes
    /// with the harness.
    pub fn attach(&mut self, program: &str, iface: &str, attach_type: TcAttachType) -> Result<()> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        prog.attach(iface, attach_type)
            .with_context(|| format!("attaching {program} to {iface}"))?;
        Ok(())
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// One of the loaded classifiers.
    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    // ---- maps ---------------------------------------------------------------------

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(HashMap::try_from(map)?)
    }

    fn trie<K: Pod, V: Pod>(&mut self, name: &str) -> Result<LpmTrie<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(LpmTrie::try_from(map)?)
    }

    /// `PORTS[ifindex] = port`.
    pub fn add_port(&mut self, ifindex: u32, port: PortInfo) -> Result<()> {
        self.hash::<u32, PortInfo>(map_names::PORTS)?
            .insert(ifindex, port, 0)?;
        Ok(())
    }

    /// Lets port `slot` send from `mac` (an allowed address pair's MAC).
    pub fn allow_mac(&mut self, slot: u32, mac: Mac) -> Result<()> {
        let key = PortMacKey {
            port_slot: slot,
            mac,
            _pad: [0; 2],
        };
        self.hash::<PortMacKey, u32>(map_names::PORT_MACS)?
            .insert(key, 1, 0)?;
        Ok(())
    }

    /// `PORT_IP4`: port `slot` may send from `mac` with source `addr`.
    pub fn allow_ip4(&mut self, slot: u32, mac: Mac, addr: Ipv4Addr) -> Result<()> {
        let key = PortAddr4 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: addr.octets(),
        };
        self.hash::<PortAddr4, u32>(map_names::PORT_IP4)?
            .insert(key, 1, 0)?;
        Ok(())
    }

    /// `PORT_NET4`: port `slot` may send from `mac` with any source in `net`. The port
    /// also needs `HAS_NET4` in its flags.
    pub fn allow_net4(&mut self, slot: u32, mac: Mac, net: Ipv4Net) -> Result<()> {
        let data = PortAddr4 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: net.network().octets(),
        };
        let key = Key::new(PORT_ADDR_FIXED_BITS + u32::from(net.prefix_len()), data);
        self.trie::<PortAddr4, u32>(map_names::PORT_NET4)?
            .insert(&key, 1, 0)?;
        Ok(())
    }

    /// `PORT_IP6`: port `slot` may send from `mac` with source `addr`.
    pub fn allow_ip6(&mut self, slot: u32, mac: Mac, addr: Ipv6Addr) -> Result<()> {
        let key = PortAddr6 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: addr.octets(),
        };
        self.hash::<PortAddr6, u32>(map_names::PORT_IP6)?
            .insert(key, 1, 0)?;
        Ok(())
    }

    /// `PORT_NET6`: as [`Harness::allow_net4`]; the port needs `HAS_NET6`.
    pub fn allow_net6(&mut self, slot: u32, mac: Mac, net: Ipv6Net) -> Result<()> {
        let data = PortAddr6 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: net.network().octets(),
        };
        let key = Key::new(PORT_ADDR_FIXED_BITS + u32::from(net.prefix_len()), data);
        self.trie::<PortAddr6, u32>(map_names::PORT_NET6)?
            .insert(&key, 1, 0)?;
        Ok(())
    }

    /// `FDB[network, mac] = entry`.
    pub fn add_fdb(&mut self, network: u32, mac: Mac, entry: FdbEntry) -> Result<()> {
        let key = FdbKey {
            network_slot: network,
            mac,
            _pad: [0; 2],
        };
        self.hash::<FdbKey, FdbEntry>(map_names::FDB)?
            .insert(key, entry, 0)?;
        Ok(())
    }

    /// `FLOOD[network]` = `ports`.
    pub fn set_flood(&mut self, network: u32, ports: &[FloodEntry]) -> Result<()> {
        ensure!(
            ports.len() <= MAX_FLOOD_PORTS,
            "more than {MAX_FLOOD_PORTS} flood ports"
        );
        let mut set = FloodSet {
            count: ports.len() as u32,
            ..FloodSet::default()
        };
        set.ports[..ports.len()].copy_from_slice(ports);
        self.hash::<u32, FloodSet>(map_names::FLOOD)?
            .insert(network, set, 0)?;
        Ok(())
    }

    /// `PORT_STATS[slot]`, summed over CPUs.
    pub fn port_stats(&self, slot: u32) -> Result<PortStats> {
        let values = self.per_cpu::<PortStats>(map_names::PORT_STATS, slot)?;
        let mut sum = PortStats::default();
        for v in values.iter() {
            sum.rx_packets += v.rx_packets;
            sum.rx_bytes += v.rx_bytes;
            sum.tx_packets += v.tx_packets;
            sum.tx_bytes += v.tx_bytes;
            for (s, d) in sum.drops.iter_mut().zip(v.drops) {
                *s += d;
            }
        }
        Ok(sum)
    }

    /// `NOPORT_DROPS[reason]`, summed over CPUs.
    pub fn noport_drops(&self, reason: DropReason) -> Result<u64> {
        let values = self.per_cpu::<u64>(map_names::NOPORT_DROPS, reason as u32)?;
        Ok(values.iter().sum())
    }

    fn per_cpu<T: Pod>(&self, name: &str, index: u32) -> Result<PerCpuValues<T>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(PerCpuArray::<_, T>::try_from(map)?.get(&index, 0)?)
    }

    // ---- runs ---------------------------------------------------------------------

    /// Runs `frame` through `port_ingress` as received on device `ifindex`.
    pub fn ingress(&mut self, ifindex: u32, frame: &[u8]) -> Result<Outcome> {
        self.run(program_names::PORT_INGRESS, ifindex, 0, frame)
    }

    /// Runs `frame` through `port_egress` as sent to device `ifindex` with `mark`.
    pub fn egress(&mut self, ifindex: u32, mark: u32, frame: &[u8]) -> Result<Outcome> {
        self.run(program_names::PORT_EGRESS, ifindex, mark, frame)
    }

    /// Runs `frame` once through the classifier `program` with a `__sk_buff` whose
    /// `ifindex` and `mark` are set. The verdict is cleared before the run, so a
    /// program that traces nothing leaves `action == 0`.
    pub fn run(&mut self, program: &str, ifindex: u32, mark: u32, frame: &[u8]) -> Result<Outcome> {
        self.clear_verdict()?;
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let result = self
            .program(program)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program} on ifindex {ifindex}"))?;
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into()?);
        Ok(Outcome {
            ret: result.return_value as i32,
            verdict: self.verdict()?,
            mark,
        })
    }

    /// Runs `frame` `repeat` times through `program`; the mean time per run.
    pub fn bench(
        &self,
        program: &str,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration> {
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let result = self.program(program)?.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx_in),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok(result.duration)
    }

    fn clear_verdict(&mut self) -> Result<()> {
        let cpus = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let map = self
            .ebpf
            .map_mut(map_names::VERDICT)
            .context("no VERDICT map")?;
        let mut verdicts = PerCpuArray::<_, Verdict>::try_from(map)?;
        verdicts.set(
            0,
            PerCpuValues::try_from(vec![Verdict::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    /// The verdict of the last run: the CPU it ran on is the one that wrote one.
    fn verdict(&self) -> Result<Verdict> {
        let values = self.per_cpu::<Verdict>(map_names::VERDICT, 0)?;
        let mut written = values.iter().filter(|v| v.action != 0);
        let verdict = written.next().copied().unwrap_or_default();
        if written.next().is_some() {
            bail!("more than one CPU wrote a verdict");
        }
        Ok(verdict)
    }
}
