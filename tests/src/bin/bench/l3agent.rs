//! The NAT benchmark's peer: a Linux router namespace with the iptables rules Neutron's
//! L3 agent installs in a legacy (not DVR, not HA) router, `qrouter-<id>`, with one
//! external gateway port (device `qg`, SNAT address the gateway's fixed IP), one
//! internal port (device `qr`) and floating IPs. Read from openstack/neutron master
//! (`neutron/agent/l3/router_info.py`, `legacy_router.py`, `namespaces.py`,
//! `neutron/agent/linux/iptables_manager.py`, `metadata/driver.py`) and written out as
//! the state the agent converges to after its first `RouterInfo.process()`, with the
//! default configuration (`external_ingress_mark` 0x2, `metadata_access_mark` 0x1,
//! `comment_iptables_rules` and `use_random_fully` on, iptables ≥ 1.6.0, no address
//! scopes, SNAT enabled). Every wrapped chain is `neutron-l3-agent-<name>` (the agent's
//! binary name, 16 characters, is the wrap prefix).
//!
//! Where each group of rules comes from:
//!
//! - `IptablesManager.__init__`, `initialize_mangle_table`, `initialize_nat_table`,
//!   `_configure_builtin_chains`: a wrapped chain per built-in chain with a jump from
//!   it (filter INPUT/OUTPUT/FORWARD, raw PREROUTING/OUTPUT, mangle all five, nat
//!   PREROUTING/OUTPUT/POSTROUTING); `neutron-filter-top` at the top of filter FORWARD
//!   and OUTPUT, jumping to the wrapped `local`; mangle `PREROUTING -j mark`; nat
//!   `POSTROUTING -j neutron-postrouting-bottom`, which jumps (commented "Perform source
//!   NAT on outgoing traffic.") to `snat`, which first jumps to `float-snat`. The raw
//!   chains and the filter `INPUT`/`OUTPUT`/`local` chains stay empty.
//! - `RouterInfo._initialize_address_scope_iptables`: mangle chains `scope`,
//!   `floatingip`, `float-snat`; mangle PREROUTING `-j scope`, the CONNMARK
//!   `--restore-mark` of the 0xffff0000 address-scope bits, `-j floatingip`; mangle
//!   float-snat's CONNMARK `--save-mark`; filter `FORWARD -j scope`.
//! - `RouterInfo.initialize_metadata_iptables`: mangle PREROUTING marks TCP to
//!   169.254.169.254:80 arriving on `qr-+` with 0x1/0xffff (Neutron's own device
//!   wildcard, kept literally). Its filter `scope` rule `-m mark --mark 0x1/0xffff -j
//!   DROP` is *not* here because the agent does not keep it: the first
//!   `process_address_scope()` empties filter `scope` (`_add_address_scope_mark`) and
//!   nothing adds it back.
//! - `_handle_router_snat_rules` → `_add_snat_rules`:
//!   `process_external_port_address_scope_routing` (mangle POSTROUTING `-o qg` CONNMARK
//!   `--save-mark`); `external_gateway_nat_snat_rules` (snat `-o qg -j SNAT
//!   --to-source GW --random-fully`); `external_gateway_nat_fip_rules`, i.e.
//!   `_prevent_snat_for_internal_traffic_rule` (POSTROUTING `! -o qg -m conntrack !
//!   --ctstate DNAT -j ACCEPT`) and the SNAT to the gateway address of DNATed traffic
//!   that did not come in on `qg` (`-m mark ! --mark 0x2/0xffff -m conntrack --ctstate
//!   DNAT`), so hairpinned traffic from a VM to another VM's floating IP comes back
//!   through the router; `external_gateway_mangle_rules` (mangle `mark`: `-i qg` gets
//!   0x2/0xffff). `_empty_snat_chains` first empties nat `snat`, so its `-j float-snat`
//!   is re-added by `_handle_router_snat_rules`, still first.
//!
//!   The POSTROUTING ACCEPT is the current form, `! -o qg`. Until 2019 it also had
//!   `! -i qg`; commit dfa37b22 ("Don't match input interface in POSTROUTING table",
//!   bug 1834825) dropped that because POSTROUTING has no input device and with the
//!   nftables backend of the time (RHEL 8) the rule then never matched. (On kernel 6.18
//!   with iptables 1.8.9 both forms match in a user chain, on both backends.)
//! - `floating_forward_rules`, per floating IP: nat PREROUTING and OUTPUT `-d FIP/32 -j
//!   DNAT --to-destination FIXED`, float-snat `-s FIXED/32 -j SNAT --to-source FIP
//!   --random-fully`.
//! - `_add_address_scope_mark` (no address scopes: every port has the default scope's
//!   mark, id 1024 << 16 = 0x4000000/0xffff0000): mangle `scope` marks what comes in on
//!   `qr` and on `qg`; filter `scope` drops what goes out of `qr` without that mark.
//!   With SNAT enabled, `qg` gets no filter rule.
//! - `floating_mangle_rules` / `process_floating_ip_address_scope_rules`: nothing. The
//!   agent skips floating IPs whose fixed IP is in the external network's address scope,
//!   and without address scopes both scopes are "none", so `floatingip` and mangle
//!   `float-snat` get no per-floating-IP rules.
//!
//! The rules name no internal subnet: since Kilo (commit f852a89f, "Enable default SNAT
//! from networks connected to a router indirectly") the agent SNATs everything leaving
//! `qg` instead of writing `-s CIDR -j SNAT` per subnet, so `internal` only serves to
//! check the floating IPs' fixed addresses.
//!
//! Left out:
//! - the metadata proxy's rules (`metadata/driver.py`, `apply_metadata_nat_rules`):
//!   nat PREROUTING `-d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 -j
//!   REDIRECT --to-ports 9697`, filter INPUT `-m mark --mark 0x1/0xffff -j ACCEPT` and
//!   `-p tcp -m tcp --dport 9697 -j DROP`: no metadata proxy runs here;
//! - everything IPv6 (`ip6tables`, RA, IPv6 forwarding), L3 agent extensions (port
//!   forwarding, conntrack helpers, FIP QoS, NDP proxy, SNAT logging) and address
//!   scopes;
//! - outside iptables: gratuitous ARPs for the new addresses, the default route via the
//!   external subnet's gateway (the caller adds one if its topology needs it).
//!
//! The output has Neutron's layout: tables in sorted order (filter, mangle, nat, raw),
//! every chain a table uses declared `:NAME - [0:0]` (built-in chains with policy `-`,
//! left alone), chains in sorted order, each chain's rules in the order the agent adds
//! them. Neutron writes them as `-I CHAIN N` into a namespace's empty tables with
//! `iptables-restore -n`; this writes `-A` in the same order, with the same result.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};
use dataplane_tests::netns::{NetNs, MAX_IFNAME_LEN};
use ipnet::Ipv4Net;

/// The agent's wrap prefix: `neutron-l3-agent`, its binary name (at most 16 characters).
const WRAP: &str = "neutron-l3-agent";
/// `external_ingress_mark` / `metadata_access_mark` under `ROUTER_MARK_MASK`.
const EXTERNAL_INGRESS_MARK: &str = "0x2/0xffff";
const METADATA_ACCESS_MARK: &str = "0x1/0xffff";
/// The default address scope's mark: id 1024 (what `available_mark_ids.pop()` takes first
/// from `range(1024, 2048)`) << 16.
const SCOPE_MARK: &str = "0x4000000/0xffff0000";
const SCOPE_MASKS: &str = "--nfmask 0xffff0000 --ctmask 0xffff0000";
/// Neutron's internal-device wildcard in the metadata mark rule.
const INTERNAL_DEV_WILDCARD: &str = "qr-+";
/// `iptables_comments.SNAT_OUT`.
const SNAT_OUT_COMMENT: &str = "Perform source NAT on outgoing traffic.";

/// A floating IP of the router and the fixed IP it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloatingIp {
    pub floating: Ipv4Addr,
    pub fixed: Ipv4Addr,
}

/// One table of an `iptables-restore` input: chains (sorted) with their rules in order.
struct Table {
    name: &'static str,
    chains: BTreeMap<String, Vec<String>>,
}

impl Table {
    fn new(name: &'static str) -> Self {
        Table {
            name,
            chains: BTreeMap::new(),
        }
    }

    /// Declares the chain `name` (built-in or not) without rules.
    fn chain(&mut self, name: &str) {
        self.chains.entry(name.to_owned()).or_default();
    }

    /// Appends `rule` to `chain`, declaring it if needed.
    fn rule(&mut self, chain: &str, rule: impl Into<String>) {
        self.chains
            .entry(chain.to_owned())
            .or_default()
            .push(rule.into());
    }

    /// `_configure_builtin_chains`: a wrapped chain per built-in one and the jump to it.
    fn wrap_builtins(&mut self, builtins: &[&str]) {
        for chain in builtins {
            self.chain(&wrapped(chain));
            self.rule(chain, format!("-j {}", wrapped(chain)));
        }
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# Generated by iptables_manager");
        let _ = writeln!(out, "*{}", self.name);
        for chain in self.chains.keys() {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for (chain, rules) in &self.chains {
            for rule in rules {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
        }
        let _ = writeln!(out, "COMMIT");
        let _ = writeln!(out, "# Completed by iptables_manager");
    }
}

/// The agent's name for its chain `name`.
fn wrapped(name: &str) -> String {
    format!("{WRAP}-{name}")
}

/// The `iptables-restore` input of a legacy router namespace with gateway device `qg`
/// (SNAT address `gateway_ip`), internal device `qr` on `internal` and `fips`, as
/// Neutron's L3 agent writes it (see the module documentation for what is in it and
/// what is left out).
///
/// Panics if a floating IP's fixed address is outside `internal`.
pub fn iptables_l3_agent(
    qg: &str,
    qr: &str,
    gateway_ip: Ipv4Addr,
    internal: Ipv4Net,
    fips: &[FloatingIp],
) -> String {
    for fip in fips {
        assert!(
            internal.contains(&fip.fixed),
            "floating IP {}'s fixed address {} is not in the internal subnet {internal}",
            fip.floating,
            fip.fixed
        );
    }
    let w = wrapped;

    // filter
    let mut filter = Table::new("filter");
    filter.rule("FORWARD", "-j neutron-filter-top");
    filter.rule("OUTPUT", "-j neutron-filter-top");
    filter.chain(&w("local"));
    filter.rule("neutron-filter-top", format!("-j {}", w("local")));
    filter.wrap_builtins(&["INPUT", "OUTPUT", "FORWARD"]);
    filter.rule(&w("FORWARD"), format!("-j {}", w("scope")));
    // `_add_address_scope_mark` (it emptied `scope` first, metadata drop included);
    // with SNAT on, the gateway device gets no drop rule.
    filter.rule(
        &w("scope"),
        format!("-o {qr} -m mark ! --mark {SCOPE_MARK} -j DROP"),
    );

    // raw
    let mut raw = Table::new("raw");
    raw.wrap_builtins(&["PREROUTING", "OUTPUT"]);

    // mangle
    let mut mangle = Table::new("mangle");
    mangle.wrap_builtins(&["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]);
    mangle.rule(&w("PREROUTING"), format!("-j {}", w("mark")));
    mangle.rule(&w("PREROUTING"), format!("-j {}", w("scope")));
    mangle.rule(
        &w("PREROUTING"),
        format!("-m connmark ! --mark 0x0/0xffff0000 -j CONNMARK --restore-mark {SCOPE_MASKS}"),
    );
    mangle.rule(&w("PREROUTING"), format!("-j {}", w("floatingip")));
    mangle.chain(&w("floatingip"));
    mangle.rule(
        &w("float-snat"),
        format!("-m connmark --mark 0x0/0xffff0000 -j CONNMARK --save-mark {SCOPE_MASKS}"),
    );
    mangle.rule(
        &w("PREROUTING"),
        format!(
            "-d 169.254.169.254/32 -i {INTERNAL_DEV_WILDCARD} -p tcp -m tcp --dport 80 -j MARK --set-xmark {METADATA_ACCESS_MARK}"
        ),
    );
    mangle.rule(
        &w("POSTROUTING"),
        format!("-o {qg} -m connmark --mark 0x0/0xffff0000 -j CONNMARK --save-mark {SCOPE_MASKS}"),
    );
    mangle.rule(
        &w("mark"),
        format!("-i {qg} -j MARK --set-xmark {EXTERNAL_INGRESS_MARK}"),
    );
    // Internal ports first, then the gateway port.
    for dev in [qr, qg] {
        mangle.rule(
            &w("scope"),
            format!("-i {dev} -j MARK --set-xmark {SCOPE_MARK}"),
        );
    }

    // nat
    let mut nat = Table::new("nat");
    nat.wrap_builtins(&["PREROUTING", "OUTPUT", "POSTROUTING"]);
    nat.rule("POSTROUTING", "-j neutron-postrouting-bottom");
    nat.rule(
        "neutron-postrouting-bottom",
        format!(
            "-m comment --comment \"{SNAT_OUT_COMMENT}\" -j {}",
            w("snat")
        ),
    );
    nat.rule(&w("snat"), format!("-j {}", w("float-snat")));
    nat.rule(
        &w("snat"),
        format!("-o {qg} -j SNAT --to-source {gateway_ip} --random-fully"),
    );
    nat.rule(
        &w("POSTROUTING"),
        format!("! -o {qg} -m conntrack ! --ctstate DNAT -j ACCEPT"),
    );
    nat.rule(
        &w("snat"),
        format!(
            "-m mark ! --mark {EXTERNAL_INGRESS_MARK} -m conntrack --ctstate DNAT -j SNAT --to-source {gateway_ip} --random-fully"
        ),
    );
    nat.chain(&w("float-snat"));
    for FloatingIp { floating, fixed } in fips {
        for chain in ["PREROUTING", "OUTPUT"] {
            nat.rule(
                &w(chain),
                format!("-d {floating}/32 -j DNAT --to-destination {fixed}"),
            );
        }
        nat.rule(
            &w("float-snat"),
            format!("-s {fixed}/32 -j SNAT --to-source {floating} --random-fully"),
        );
    }

    // Tables in sorted order, as `_apply_synchronized` writes them.
    let mut out = String::new();
    for table in [&filter, &mangle, &nat, &raw] {
        table.write(&mut out);
    }
    out
}

fn check_ifname(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= MAX_IFNAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':'),
        "{name:?} is not a usable interface name"
    );
    Ok(())
}

/// Runs `argv` with `input` on its stdin; fails unless it exits 0, saying `what` failed
/// with its stderr and, when it names a failed line of `input`, that line.
fn run_with_stdin(argv: &[&str], input: &str, what: &str) -> Result<()> {
    let (program, args) = argv.split_first().context("empty argv")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {argv:?}"))?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    // Write from another thread while this one collects the output, so a child that
    // fills its output pipes before reading all of its input cannot block us both.
    let (written, out) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output();
        (writer.join(), out)
    });
    let out = out.with_context(|| format!("{what}: waiting for {argv:?}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let failed_line = failed_line_number(&stderr)
            .and_then(|n| Some((n, input.lines().nth(n.checked_sub(1)?)?)))
            .map(|(n, line)| format!(" [input line {n}: {line}]"))
            .unwrap_or_default();
        bail!(
            "{what}: {argv:?} failed ({}): {}{failed_line}",
            out.status,
            stderr.trim()
        );
    }
    // A write error with a successful exit (the child did not read everything) is
    // still an error: the input was not all applied.
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err).with_context(|| format!("{what}: writing to {argv:?}")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The input line an `iptables-restore` error names: "Error occurred at line: N"
/// (iptables 1.8) or "line N failed" (older ones).
fn failed_line_number(stderr: &str) -> Option<usize> {
    let digits = |s: &str| {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok()
    };
    if let Some((_, rest)) = stderr.split_once("Error occurred at line: ") {
        return digits(rest);
    }
    stderr.split("line ").skip(1).find_map(|rest| {
        let (number, tail) = rest.split_once(' ')?;
        tail.starts_with("failed").then(|| digits(number)).flatten()
    })
}

/// `ip -n NS -batch -` with `commands`, one a line.
fn ip_batch(ns: &NetNs, commands: &str, what: &str) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    run_with_stdin(&["ip", "-n", ns.name(), "-batch", "-"], commands, what)
}

fn sysctls(ns: &NetNs, settings: &[&str]) -> Result<()> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(settings);
    ns.exec_ok(&argv).map(drop)
}

/// Makes `ns`, which holds the devices `qg` and `qr` (both up), the L3 agent's router
/// namespace of a legacy router with gateway address `gateway` on `qg`, internal port
/// address `internal_gateway` on `qr` and `fips`: the sysctls `Namespace.create` sets,
/// the addresses (each floating IP as a /32 on `qg`), and the rules of
/// [`iptables_l3_agent`] fed on stdin to `loader` (e.g. `["iptables-restore"]` or
/// `["iptables-legacy-restore"]`) inside the namespace. In the agent's order: ports'
/// addresses, NAT rules, then the floating IPs' addresses.
pub fn configure_router(
    ns: &NetNs,
    qg: &str,
    qr: &str,
    gateway: Ipv4Net,
    internal_gateway: Ipv4Net,
    fips: &[FloatingIp],
    loader: &[&str],
) -> Result<()> {
    check_ifname(qg)?;
    check_ifname(qr)?;
    ensure!(!loader.is_empty(), "no rules loader given");
    let internal = internal_gateway.trunc();
    for fip in fips {
        ensure!(
            internal.contains(&fip.fixed),
            "floating IP {}'s fixed address {} is not in the internal subnet {internal}",
            fip.floating,
            fip.fixed
        );
    }
    let name = ns.name();
    sysctls(
        ns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ],
    )
    .with_context(|| format!("router sysctls in {name}"))?;

    ip_batch(
        ns,
        &format!(
            "address add {internal_gateway} brd + dev {qr}\naddress add {gateway} brd + dev {qg}\n"
        ),
        &format!("port addresses in {name}"),
    )?;

    let rules = iptables_l3_agent(qg, qr, gateway.addr(), internal, fips);
    let mut argv = vec!["ip", "netns", "exec", name];
    argv.extend_from_slice(loader);
    run_with_stdin(
        &argv,
        &rules,
        &format!(
            "loading the L3 agent's rules ({} floating IPs) in {name}",
            fips.len()
        ),
    )?;
    // `Namespace.create` sets this one too; it exists once conntrack is loaded, which
    // the rules just did.
    sysctls(ns, &["net.netfilter.nf_conntrack_tcp_be_liberal=1"])
        .with_context(|| format!("conntrack sysctl in {name}"))?;

    let mut commands = String::new();
    for fip in fips {
        let _ = writeln!(commands, "address add {}/32 dev {qg}", fip.floating);
    }
    ip_batch(
        ns,
        &commands,
        &format!("{} floating IP addresses in {name}", fips.len()),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const TARGETS: [&str; 8] = [
        "ACCEPT", "DROP", "RETURN", "DNAT", "SNAT", "MARK", "CONNMARK", "REDIRECT",
    ];

    fn fips() -> [FloatingIp; 2] {
        [
            FloatingIp {
                floating: Ipv4Addr::new(203, 0, 113, 100),
                fixed: Ipv4Addr::new(10, 0, 0, 5),
            },
            FloatingIp {
                floating: Ipv4Addr::new(203, 0, 113, 101),
                fixed: Ipv4Addr::new(10, 0, 0, 6),
            },
        ]
    }

    fn rules() -> String {
        iptables_l3_agent(
            "qg-1234",
            "qr-5678",
            Ipv4Addr::new(203, 0, 113, 10),
            "10.0.0.0/24".parse().unwrap(),
            &fips(),
        )
    }

    /// Each table's lines (comments dropped), by table name; `*name` starts a table.
    fn tables(text: &str) -> BTreeMap<String, Vec<String>> {
        let mut tables = BTreeMap::<String, Vec<String>>::new();
        let mut current = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(name) = line.strip_prefix('*') {
                assert!(
                    tables.insert(name.to_owned(), Vec::new()).is_none(),
                    "table {name} twice"
                );
                current = Some(name.to_owned());
            } else {
                let table = current.as_ref().expect("a line outside any table");
                tables.get_mut(table).unwrap().push(line.to_owned());
            }
        }
        tables
    }

    fn count(text: &str, line: &str) -> usize {
        text.lines().filter(|l| *l == line).count()
    }

    #[test]
    fn each_floating_ip_has_its_nat_rules_once() {
        let text = rules();
        for FloatingIp { floating, fixed } in fips() {
            for line in [
                format!("-A neutron-l3-agent-PREROUTING -d {floating}/32 -j DNAT --to-destination {fixed}"),
                format!("-A neutron-l3-agent-OUTPUT -d {floating}/32 -j DNAT --to-destination {fixed}"),
                format!("-A neutron-l3-agent-float-snat -s {fixed}/32 -j SNAT --to-source {floating} --random-fully"),
            ] {
                assert_eq!(count(&text, &line), 1, "{line}\n{text}");
            }
        }
        assert_eq!(text.matches("-j DNAT").count(), 4);
    }

    #[test]
    fn gateway_rules_are_there() {
        let text = rules();
        for line in [
            "-A neutron-l3-agent-snat -j neutron-l3-agent-float-snat",
            "-A neutron-l3-agent-snat -o qg-1234 -j SNAT --to-source 203.0.113.10 --random-fully",
            "-A neutron-l3-agent-snat -m mark ! --mark 0x2/0xffff -m conntrack --ctstate DNAT -j SNAT --to-source 203.0.113.10 --random-fully",
            "-A neutron-l3-agent-POSTROUTING ! -o qg-1234 -m conntrack ! --ctstate DNAT -j ACCEPT",
            "-A neutron-l3-agent-mark -i qg-1234 -j MARK --set-xmark 0x2/0xffff",
            "-A neutron-l3-agent-scope -o qr-5678 -m mark ! --mark 0x4000000/0xffff0000 -j DROP",
        ] {
            assert_eq!(count(&text, line), 1, "{line}\n{text}");
        }
        // `float-snat` comes first in `snat`, so a floating IP's own SNAT wins.
        let snat: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("-A neutron-l3-agent-snat "))
            .collect();
        assert_eq!(snat.len(), 3);
        assert!(snat[0].ends_with("-j neutron-l3-agent-float-snat"));
    }

    #[test]
    fn every_table_ends_in_commit() {
        let tables = tables(&rules());
        assert_eq!(
            tables.keys().map(String::as_str).collect::<Vec<_>>(),
            ["filter", "mangle", "nat", "raw"]
        );
        for (name, lines) in &tables {
            assert_eq!(lines.last().map(String::as_str), Some("COMMIT"), "{name}");
            assert_eq!(count(&lines.join("\n"), "COMMIT"), 1, "{name}");
        }
    }

    #[test]
    fn every_chain_used_is_declared() {
        for (name, lines) in tables(&rules()) {
            let declared: BTreeSet<&str> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| {
                    let chain = l.strip_suffix(" - [0:0]").expect(l);
                    // `iptables` takes names of at most 28 characters.
                    assert!(chain.len() <= 28, "{chain} too long");
                    chain
                })
                .collect();
            let mut used = BTreeSet::new();
            for line in lines.iter().filter(|l| l.starts_with("-A ")) {
                let words: Vec<&str> = line.split(' ').collect();
                used.insert(words[1]);
                let jump = words.iter().position(|w| *w == "-j").expect(line);
                let target = words[jump + 1];
                if !TARGETS.contains(&target) {
                    used.insert(target);
                }
            }
            let undeclared: Vec<_> = used.difference(&declared).collect();
            assert!(undeclared.is_empty(), "{name}: {undeclared:?} not declared");
            // Every declared chain other than a built-in one is jumped to.
            let jumped: BTreeSet<&str> = lines
                .iter()
                .filter_map(|l| l.split_once(" -j ").map(|(_, t)| t))
                .collect();
            for chain in &declared {
                let builtin = chain.bytes().all(|b| b.is_ascii_uppercase());
                // Mangle float-snat is only jumped to for address scopes, as in Neutron.
                let unreferenced_in_neutron =
                    name == "mangle" && *chain == "neutron-l3-agent-float-snat";
                assert!(
                    builtin || unreferenced_in_neutron || jumped.contains(chain),
                    "{name}: {chain} declared but never jumped to"
                );
            }
        }
    }

    #[test]
    fn no_floating_ips_is_fine() {
        let text = iptables_l3_agent(
            "qg",
            "qr",
            Ipv4Addr::new(203, 0, 113, 10),
            "10.0.0.0/24".parse().unwrap(),
            &[],
        );
        assert!(!text.contains("DNAT --to-destination"));
        assert!(text.contains(":neutron-l3-agent-float-snat - [0:0]"));
    }
}
