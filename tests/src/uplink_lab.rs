//! The harness of the packet tests of routers' external gateways: the datapath, port
//! devices and an uplink in a namespace, tables compiled from desired states by the
//! agent's own compiler and written by its kernel layer, frames run through
//! `port_ingress` and the uplink's programs.
use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use dataplane_abi::{program_names, verdict_action, DropReason};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, Slots, Uplink},
        model::State,
    },
    kernel::datapath::{Datapath, TestRunOutcome},
};

use crate::testrun::{arrive_on_uplink, UplinkArrival, TC_ACT_OK};

pub struct UplinkLab {
    pub datapath: Datapath,
    /// Device name to ifindex, the uplink's among them.
    pub devices: BTreeMap<String, u32>,
    pub slots: Slots,
    pub uplink: Uplink,
    /// The node the ports are bound to, and the uplink's device name.
    pub node_name: &'static str,
    pub uplink_device: &'static str,
}

impl UplinkLab {
    /// Compiles `state` for this node and writes it into the datapath.
    pub fn compile(&mut self, state: &State) -> Result<()> {
        let compiled = compile(
            state,
            &NodeView {
                node_name: self.node_name,
                interfaces: &self.devices,
                peer_devices: &Default::default(),
                uplink: Some(&self.uplink),
            },
            &mut self.slots,
        );
        self.datapath.sync(&compiled)?;
        Ok(())
    }

    pub fn port_ingress(&mut self, from: &str, frame: &[u8]) -> Result<TestRunOutcome> {
        Ok(self
            .datapath
            .test_run(program_names::PORT_INGRESS, self.devices[from], 0, frame, 1)?)
    }

    /// `frame` from device `from` is sent to device `to`; returns it as it leaves.
    pub fn expect_to(&mut self, from: &str, frame: &[u8], to: &str, what: &str) -> Result<Vec<u8>> {
        let out = self.port_ingress(from, frame)?;
        self.delivered(out, to, what)
    }

    /// The frame of `out`, which must be a unicast to device `to`.
    pub fn delivered(&self, out: TestRunOutcome, to: &str, what: &str) -> Result<Vec<u8>> {
        ensure!(
            out.verdict.action == verdict_action::UNICAST
                && out.verdict.ifindexes[0] == self.devices[to],
            "{what}: action {} reason {:?} to ifindex {} (devices {:?}), expected unicast to {to}",
            out.verdict.action,
            DropReason::from_u32(out.verdict.reason),
            out.verdict.ifindexes[0],
            self.devices,
        );
        Ok(out.frame)
    }

    pub fn expect_drop(
        &mut self,
        from: &str,
        frame: &[u8],
        reason: DropReason,
        what: &str,
    ) -> Result<()> {
        let out = self.port_ingress(from, frame)?;
        dropped(&out, reason, what)
    }

    /// The uplink's drops of `reason` so far.
    pub fn uplink_drops(&self, reason: DropReason) -> Result<u64> {
        Ok(self
            .datapath
            .uplink_counters()?
            .drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n))
    }

    /// `frame` arriving on the uplink (see `testrun::arrive_on_uplink`).
    pub fn arrive(&mut self, frame: &[u8]) -> Result<UplinkArrival> {
        arrive_on_uplink(&mut self.datapath, self.devices[self.uplink_device], frame)
    }

    /// `frame` from outside reaches device `to`; returns it as delivered.
    pub fn inbound_to(&mut self, frame: &[u8], to: &str, what: &str) -> Result<Vec<u8>> {
        match self.arrive(frame)? {
            UplinkArrival::Passed(out) => self.delivered(*out, to, what),
            UplinkArrival::Tx(_) => bail!("{what}: uplink_xdp answered it"),
            UplinkArrival::Dropped(r) => bail!("{what}: uplink_xdp dropped it ({r:?})"),
        }
    }

    pub fn inbound_drop(&mut self, frame: &[u8], reason: DropReason, what: &str) -> Result<()> {
        match self.arrive(frame)? {
            UplinkArrival::Passed(out) => dropped(&out, reason, what),
            UplinkArrival::Tx(_) => bail!("{what}: uplink_xdp answered it"),
            UplinkArrival::Dropped(r) => {
                ensure!(
                    r == [reason],
                    "{what}: uplink_xdp dropped it as {r:?}, not {reason:?}"
                );
                Ok(())
            }
        }
    }

    /// `frame` from outside is answered by `uplink_xdp`; returns the answer.
    pub fn answered(&mut self, frame: &[u8], what: &str) -> Result<Vec<u8>> {
        match self.arrive(frame)? {
            UplinkArrival::Tx(answer) => Ok(answer),
            UplinkArrival::Passed(_) => bail!("{what}: passed on, not answered"),
            UplinkArrival::Dropped(r) => bail!("{what}: dropped ({r:?})"),
        }
    }

    /// `frame` from outside passes both uplink programs untouched, to the host.
    pub fn passes_to_host(&mut self, frame: &[u8], what: &str) -> Result<()> {
        match self.arrive(frame)? {
            UplinkArrival::Passed(out) => {
                ensure!(
                    out.return_code == TC_ACT_OK && out.verdict.action == 0,
                    "{what}: uplink_ingress returned {} with action {}",
                    out.return_code,
                    out.verdict.action
                );
                Ok(())
            }
            UplinkArrival::Tx(_) => bail!("{what}: uplink_xdp answered it"),
            UplinkArrival::Dropped(r) => bail!("{what}: uplink_xdp dropped it ({r:?})"),
        }
    }
}

/// `out` must be a drop for `reason`.
pub fn dropped(out: &TestRunOutcome, reason: DropReason, what: &str) -> Result<()> {
    ensure!(
        out.verdict.action == verdict_action::DROP
            && DropReason::from_u32(out.verdict.reason) == Some(reason),
        "{what}: action {} reason {:?}, expected drop {reason:?}",
        out.verdict.action,
        DropReason::from_u32(out.verdict.reason)
    );
    Ok(())
}
