//! Writing a compiled [`DatapathTables`] into one map set: by difference from what it
//! holds, or, when that is not known, by comparing with what the maps actually hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsFd, BorrowedFd},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        HashMap, IterableMap, MapData, MapError,
    },
    sys::SyscallError,
};
use dataplane_abi::{map_names, REMOTE4_FULL_BITS, REMOTE6_FULL_BITS, RULE_LOOKUP_BITS};
use tracing::warn;

use super::{batch, DatapathError, SetMaps};
use crate::core::compile::DatapathTables;

/// Every map the agent writes from `DatapathTables`, once: `$each!(field, NAME, kind)`
/// for each, the kind saying how the table is kept (`hash` and `trie` maps, `set` and
/// `trie_set` key sets written with value 1, and `split(host_field, HOST_NAME, BITS)`:
/// an LPM table whose entries of prefix length `BITS` are in the hash map `HOST_NAME`,
/// the others in the trie, see `dataplane_abi::policy`). The per-CPU counters,
/// conntrack and SNAT maps are the programs' own.
macro_rules! written_maps {
    ($each:ident) => {
        [
            $each!(ports, PORTS, hash),
            $each!(port_macs, PORT_MACS, set),
            $each!(port_ip4, PORT_IP4, set),
            $each!(port_net4, PORT_NET4, trie_set),
            $each!(port_ip6, PORT_IP6, set),
            $each!(port_net6, PORT_NET6, trie_set),
            $each!(fdb, FDB, hash),
            $each!(flood, FLOOD, hash),
            $each!(
                sg_remote4,
                SG_REMOTE4,
                split(sg_host4, SG_HOST4, REMOTE4_FULL_BITS)
            ),
            $each!(
                sg_remote6,
                SG_REMOTE6,
                split(sg_host6, SG_HOST6, REMOTE6_FULL_BITS)
            ),
            $each!(
                sg_rules,
                SG_RULES,
                split(sg_rule_ports, SG_RULE_PORTS, RULE_LOOKUP_BITS)
            ),
            $each!(router_ifs, ROUTER_IFS, hash),
            $each!(routes4, ROUTES4, trie),
            $each!(routes6, ROUTES6, trie),
            $each!(neigh4, NEIGH4, hash),
            $each!(neigh6, NEIGH6, hash),
            $each!(router_gw, ROUTER_GW, hash),
            $each!(router_gw6, ROUTER_GW6, hash),
            $each!(gateway_macs, GATEWAY_MACS, hash),
            $each!(ext_addrs4, EXT_ADDRS4, hash),
            $each!(ext_addrs6, EXT_ADDRS6, hash),
            $each!(fips4, FIPS4, hash),
            $each!(fip_of4, FIP_OF4, hash),
        ]
    };
}
pub(super) use written_maps;

impl SetMaps {
    /// Makes the maps of the idle set hold `new` instead of `old` by writing only the
    /// difference. Packets do not read the set while it is written, so the maps need no
    /// order among them; the others keep one anyway (a port after its address and
    /// forwarding entries, and removed before them).
    pub fn write(&mut self, old: &DatapathTables, new: &DatapathTables) -> MapResult {
        let m = self;
        std::thread::scope(|scope| {
            // The remote addresses are written on a thread of their own beside the others
            // (each map has its own lock in the kernel): a node's commit is mostly these
            // writes, and the two halves take about as long.
            let remote4 = Split {
                trie: fd_of(&m.sg_remote4),
                host: fd_of(&m.sg_host4),
                full_bits: REMOTE4_FULL_BITS,
                names: (map_names::SG_REMOTE4, map_names::SG_HOST4),
            };
            let remote6 = Split {
                trie: fd_of(&m.sg_remote6),
                host: fd_of(&m.sg_host6),
                full_bits: REMOTE6_FULL_BITS,
                names: (map_names::SG_REMOTE6, map_names::SG_HOST6),
            };
            let remotes = scope.spawn(move || -> MapResult {
                remote4.upsert(&old.sg_remote4, &new.sg_remote4)?;
                remote6.upsert(&old.sg_remote6, &new.sg_remote6)?;
                remote6.remove(&old.sg_remote6, &new.sg_remote6)?;
                remote4.remove(&old.sg_remote4, &new.sg_remote4)
            });
            let others = m.write_others(old, new);
            let remotes = remotes
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            others.and(remotes)
        })
    }

    /// [`SetMaps::write`] of every map but the remote addresses'.
    fn write_others(&self, old: &DatapathTables, new: &DatapathTables) -> MapResult {
        let m = self;
        let rules = Split {
            trie: fd_of(&m.sg_rules),
            host: fd_of(&m.sg_rule_ports),
            full_bits: RULE_LOOKUP_BITS,
            names: (map_names::SG_RULES, map_names::SG_RULE_PORTS),
        };
        // Rules before the ports that lead to them.
        rules.upsert(&old.sg_rules, &new.sg_rules)?;
        upsert_set(
            fd_of(&m.port_macs),
            &old.port_macs,
            &new.port_macs,
            map_names::PORT_MACS,
        )?;
        upsert_set(
            fd_of(&m.port_ip4),
            &old.port_ip4,
            &new.port_ip4,
            map_names::PORT_IP4,
        )?;
        upsert_set(
            fd_of(&m.port_ip6),
            &old.port_ip6,
            &new.port_ip6,
            map_names::PORT_IP6,
        )?;
        upsert_trie(
            fd_of(&m.port_net4),
            &old.port_net4,
            &new.port_net4,
            map_names::PORT_NET4,
        )?;
        upsert_trie(
            fd_of(&m.port_net6),
            &old.port_net6,
            &new.port_net6,
            map_names::PORT_NET6,
        )?;
        upsert_map(fd_of(&m.fdb), &old.fdb, &new.fdb, map_names::FDB)?;
        upsert_map(fd_of(&m.flood), &old.flood, &new.flood, map_names::FLOOD)?;
        // Routes and neighbours before the interfaces that lead to them; translations
        // before the external routes and addresses that lead to them.
        upsert_map(
            fd_of(&m.neigh4),
            &old.neigh4,
            &new.neigh4,
            map_names::NEIGH4,
        )?;
        upsert_map(
            fd_of(&m.neigh6),
            &old.neigh6,
            &new.neigh6,
            map_names::NEIGH6,
        )?;
        upsert_map(fd_of(&m.fips4), &old.fips4, &new.fips4, map_names::FIPS4)?;
        upsert_map(
            fd_of(&m.fip_of4),
            &old.fip_of4,
            &new.fip_of4,
            map_names::FIP_OF4,
        )?;
        upsert_map(
            fd_of(&m.router_gw),
            &old.router_gw,
            &new.router_gw,
            map_names::ROUTER_GW,
        )?;
        upsert_map(
            fd_of(&m.ext_addrs4),
            &old.ext_addrs4,
            &new.ext_addrs4,
            map_names::EXT_ADDRS4,
        )?;
        upsert_map(
            fd_of(&m.router_gw6),
            &old.router_gw6,
            &new.router_gw6,
            map_names::ROUTER_GW6,
        )?;
        upsert_map(
            fd_of(&m.ext_addrs6),
            &old.ext_addrs6,
            &new.ext_addrs6,
            map_names::EXT_ADDRS6,
        )?;
        upsert_trie_map(
            fd_of(&m.routes4),
            &old.routes4,
            &new.routes4,
            map_names::ROUTES4,
        )?;
        upsert_trie_map(
            fd_of(&m.routes6),
            &old.routes6,
            &new.routes6,
            map_names::ROUTES6,
        )?;
        upsert_map(
            fd_of(&m.router_ifs),
            &old.router_ifs,
            &new.router_ifs,
            map_names::ROUTER_IFS,
        )?;
        upsert_map(
            fd_of(&m.gateway_macs),
            &old.gateway_macs,
            &new.gateway_macs,
            map_names::GATEWAY_MACS,
        )?;
        upsert_map(fd_of(&m.ports), &old.ports, &new.ports, map_names::PORTS)?;

        // (While the set is active, the port is what turns a device's frames on.)
        remove_map(fd_of(&m.ports), &old.ports, &new.ports, map_names::PORTS)?;
        remove_map(
            fd_of(&m.gateway_macs),
            &old.gateway_macs,
            &new.gateway_macs,
            map_names::GATEWAY_MACS,
        )?;
        remove_map(
            fd_of(&m.router_ifs),
            &old.router_ifs,
            &new.router_ifs,
            map_names::ROUTER_IFS,
        )?;
        remove_trie_map(
            fd_of(&m.routes6),
            &old.routes6,
            &new.routes6,
            map_names::ROUTES6,
        )?;
        remove_trie_map(
            fd_of(&m.routes4),
            &old.routes4,
            &new.routes4,
            map_names::ROUTES4,
        )?;
        remove_map(
            fd_of(&m.ext_addrs6),
            &old.ext_addrs6,
            &new.ext_addrs6,
            map_names::EXT_ADDRS6,
        )?;
        remove_map(
            fd_of(&m.router_gw6),
            &old.router_gw6,
            &new.router_gw6,
            map_names::ROUTER_GW6,
        )?;
        remove_map(
            fd_of(&m.ext_addrs4),
            &old.ext_addrs4,
            &new.ext_addrs4,
            map_names::EXT_ADDRS4,
        )?;
        remove_map(
            fd_of(&m.router_gw),
            &old.router_gw,
            &new.router_gw,
            map_names::ROUTER_GW,
        )?;
        remove_map(
            fd_of(&m.fip_of4),
            &old.fip_of4,
            &new.fip_of4,
            map_names::FIP_OF4,
        )?;
        remove_map(fd_of(&m.fips4), &old.fips4, &new.fips4, map_names::FIPS4)?;
        remove_map(
            fd_of(&m.neigh6),
            &old.neigh6,
            &new.neigh6,
            map_names::NEIGH6,
        )?;
        remove_map(
            fd_of(&m.neigh4),
            &old.neigh4,
            &new.neigh4,
            map_names::NEIGH4,
        )?;
        remove_map(fd_of(&m.flood), &old.flood, &new.flood, map_names::FLOOD)?;
        remove_map(fd_of(&m.fdb), &old.fdb, &new.fdb, map_names::FDB)?;
        remove_trie(
            fd_of(&m.port_net6),
            &old.port_net6,
            &new.port_net6,
            map_names::PORT_NET6,
        )?;
        remove_trie(
            fd_of(&m.port_net4),
            &old.port_net4,
            &new.port_net4,
            map_names::PORT_NET4,
        )?;
        remove_set(
            fd_of(&m.port_ip6),
            &old.port_ip6,
            &new.port_ip6,
            map_names::PORT_IP6,
        )?;
        remove_set(
            fd_of(&m.port_ip4),
            &old.port_ip4,
            &new.port_ip4,
            map_names::PORT_IP4,
        )?;
        remove_set(
            fd_of(&m.port_macs),
            &old.port_macs,
            &new.port_macs,
            map_names::PORT_MACS,
        )?;
        rules.remove(&old.sg_rules, &new.sg_rules)
    }

    /// Makes every map hold exactly `wanted`, whatever it holds now (changed, added or
    /// removed behind the agent's back, or not known): the maps that were wrong, with
    /// how many entries.
    pub fn repair(
        &mut self,
        wanted: &DatapathTables,
    ) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let (m, t) = (self, wanted);
        macro_rules! repair {
            ($field:ident, $name:ident, hash) => {
                vec![(
                    map_names::$name,
                    repair_hash(&mut m.$field, &t.$field, map_names::$name)?,
                )]
            };
            ($field:ident, $name:ident, set) => {
                vec![(
                    map_names::$name,
                    repair_hash(&mut m.$field, &as_set_map(&t.$field), map_names::$name)?,
                )]
            };
            ($field:ident, $name:ident, trie) => {
                vec![(
                    map_names::$name,
                    repair_trie(&mut m.$field, &t.$field, map_names::$name)?,
                )]
            };
            ($field:ident, $name:ident, trie_set) => {
                vec![(
                    map_names::$name,
                    repair_trie(&mut m.$field, &as_set_map(&t.$field), map_names::$name)?,
                )]
            };
            ($field:ident, $name:ident, split($host:ident, $host_name:ident, $bits:ident)) => {{
                let (host, rest) = split_entries(&t.$field, $bits);
                vec![
                    (
                        map_names::$name,
                        repair_trie(&mut m.$field, &rest, map_names::$name)?,
                    ),
                    (
                        map_names::$host_name,
                        repair_hash(&mut m.$host, &host, map_names::$host_name)?,
                    ),
                ]
            }};
        }
        let drift = written_maps!(repair);
        Ok(drift
            .into_iter()
            .flatten()
            .filter(|(_, wrong)| *wrong > 0)
            .collect())
    }

    /// Whether the maps hold exactly `wanted` (read back, entry by entry, one map at a
    /// time: no copy of a whole set is made).
    pub fn holds(&self, wanted: &DatapathTables) -> Result<bool, DatapathError> {
        let (m, t) = (self, wanted);
        macro_rules! same {
            ($field:ident, $name:ident, hash) => {
                holds_exactly(&read_hash(&m.$field, map_names::$name)?, &t.$field)
            };
            ($field:ident, $name:ident, set) => {
                holds_exactly(
                    &read_hash(&m.$field, map_names::$name)?,
                    &as_set_map(&t.$field),
                )
            };
            ($field:ident, $name:ident, trie) => {
                holds_exactly(&read_trie(&m.$field, map_names::$name)?, &t.$field)
            };
            ($field:ident, $name:ident, trie_set) => {
                holds_exactly(
                    &read_trie(&m.$field, map_names::$name)?,
                    &as_set_map(&t.$field),
                )
            };
            ($field:ident, $name:ident, split($host:ident, $host_name:ident, $bits:ident)) => {
                holds_split(
                    &read_hash(&m.$host, map_names::$host_name)?,
                    &read_trie(&m.$field, map_names::$name)?,
                    &t.$field,
                    $bits,
                )
            };
        }
        Ok(written_maps!(same).into_iter().all(|same| same))
    }
}

type MapResult = Result<(), DatapathError>;

pub(super) fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// The map's file, for the batch calls.
fn fd_of<K: aya::Pod, V>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

fn batch_err(name: &'static str, call: &'static str) -> impl Fn(io::Error) -> DatapathError {
    move |io_error| DatapathError::Map {
        map: name,
        source: MapError::SyscallError(SyscallError { call, io_error }),
    }
}

fn write_entries<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    entries: &[(K, V)],
    name: &'static str,
) -> MapResult {
    if entries.is_empty() {
        return Ok(());
    }
    batch::update(fd, entries).map_err(batch_err(name, "bpf_map_update_batch"))
}

/// A removal of an entry that is already gone is what the caller wanted anyway.
fn remove_keys<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K], name: &'static str) -> MapResult {
    if keys.is_empty() {
        return Ok(());
    }
    let gone = batch::delete(fd, keys).map_err(batch_err(name, "bpf_map_delete_batch"))?;
    if gone > 0 {
        warn!(
            map = name,
            entries = gone,
            "entries to remove were already gone"
        );
    }
    Ok(())
}

fn upsert_map<K, V>(
    map: BorrowedFd<'_>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    name: &'static str,
) -> MapResult
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let changed: Vec<(K, V)> = new
        .iter()
        .filter(|(key, value)| old.get(*key) != Some(*value))
        .map(|(key, value)| (*key, *value))
        .collect();
    write_entries(map, &changed, name)
}

fn remove_map<K, V>(
    map: BorrowedFd<'_>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    name: &'static str,
) -> MapResult
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    let gone: Vec<K> = old
        .keys()
        .filter(|key| !new.contains_key(key))
        .copied()
        .collect();
    remove_keys(map, &gone, name)
}

fn upsert_set<K: aya::Pod + Ord>(
    map: BorrowedFd<'_>,
    old: &BTreeSet<K>,
    new: &BTreeSet<K>,
    name: &'static str,
) -> MapResult {
    let added: Vec<(K, u32)> = new.difference(old).map(|key| (*key, 1)).collect();
    write_entries(map, &added, name)
}

fn remove_set<K: aya::Pod + Ord>(
    map: BorrowedFd<'_>,
    old: &BTreeSet<K>,
    new: &BTreeSet<K>,
    name: &'static str,
) -> MapResult {
    let gone: Vec<K> = old.difference(new).copied().collect();
    remove_keys(map, &gone, name)
}

fn upsert_trie<K: aya::Pod + Ord>(
    trie: BorrowedFd<'_>,
    old: &BTreeSet<(u32, K)>,
    new: &BTreeSet<(u32, K)>,
    name: &'static str,
) -> MapResult {
    let added: Vec<(LpmKey<K>, u32)> = new
        .difference(old)
        .map(|(prefix_len, data)| (LpmKey::new(*prefix_len, *data), 1))
        .collect();
    write_entries(trie, &added, name)
}

fn remove_trie<K: aya::Pod + Ord>(
    trie: BorrowedFd<'_>,
    old: &BTreeSet<(u32, K)>,
    new: &BTreeSet<(u32, K)>,
    name: &'static str,
) -> MapResult {
    let gone: Vec<LpmKey<K>> = old
        .difference(new)
        .map(|(prefix_len, data)| LpmKey::new(*prefix_len, *data))
        .collect();
    remove_keys(trie, &gone, name)
}

fn upsert_trie_map<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    trie: BorrowedFd<'_>,
    old: &BTreeMap<(u32, K), V>,
    new: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> MapResult {
    let changed: Vec<(LpmKey<K>, V)> = new
        .iter()
        .filter(|(key, value)| old.get(*key) != Some(*value))
        .map(|((prefix_len, data), value)| (LpmKey::new(*prefix_len, *data), *value))
        .collect();
    write_entries(trie, &changed, name)
}

fn remove_trie_map<K: aya::Pod + Ord, V: aya::Pod>(
    trie: BorrowedFd<'_>,
    old: &BTreeMap<(u32, K), V>,
    new: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> MapResult {
    let gone: Vec<LpmKey<K>> = old
        .keys()
        .filter(|key| !new.contains_key(key))
        .map(|(prefix_len, data)| LpmKey::new(*prefix_len, *data))
        .collect();
    remove_keys(trie, &gone, name)
}

/// An LPM table kept as two maps (kind `split` of [`written_maps`]): its entries of
/// prefix length `full_bits` in the hash map `host`, keyed by their data, the others in
/// the trie.
#[derive(Clone, Copy)]
struct Split<'a> {
    trie: BorrowedFd<'a>,
    host: BorrowedFd<'a>,
    full_bits: u32,
    /// (trie, host map).
    names: (&'static str, &'static str),
}

impl Split<'_> {
    fn upsert<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
        &self,
        old: &BTreeMap<(u32, K), V>,
        new: &BTreeMap<(u32, K), V>,
    ) -> MapResult {
        let (mut host, mut trie) = (Vec::new(), Vec::new());
        for (&(prefix_len, data), &value) in new {
            if old.get(&(prefix_len, data)) == Some(&value) {
                continue;
            }
            if prefix_len == self.full_bits {
                host.push((data, value));
            } else {
                trie.push((LpmKey::new(prefix_len, data), value));
            }
        }
        write_entries(self.host, &host, self.names.1)?;
        write_entries(self.trie, &trie, self.names.0)
    }

    fn remove<K: aya::Pod + Ord, V: aya::Pod>(
        &self,
        old: &BTreeMap<(u32, K), V>,
        new: &BTreeMap<(u32, K), V>,
    ) -> MapResult {
        let (mut host, mut trie) = (Vec::new(), Vec::new());
        for &(prefix_len, data) in old.keys() {
            if new.contains_key(&(prefix_len, data)) {
                continue;
            }
            if prefix_len == self.full_bits {
                host.push(data);
            } else {
                trie.push(LpmKey::new(prefix_len, data));
            }
        }
        remove_keys(self.host, &host, self.names.1)?;
        remove_keys(self.trie, &trie, self.names.0)
    }
}

/// A split table's entries as its two maps hold them: (host map's, trie's).
type SplitEntries<K, V> = (BTreeMap<K, V>, BTreeMap<(u32, K), V>);

fn split_entries<K: Copy + Ord, V: Copy>(
    table: &BTreeMap<(u32, K), V>,
    full_bits: u32,
) -> SplitEntries<K, V> {
    let (mut host, mut trie) = (BTreeMap::new(), BTreeMap::new());
    for (&(prefix_len, data), &value) in table {
        if prefix_len == full_bits {
            host.insert(data, value);
        } else {
            trie.insert((prefix_len, data), value);
        }
    }
    (host, trie)
}

/// Entries in a split table's `host` map and `trie` per table.
pub(super) fn split_len<K, V>(table: &BTreeMap<(u32, K), V>, full_bits: u32) -> (u64, u64) {
    let host = table
        .keys()
        .filter(|(prefix_len, _)| *prefix_len == full_bits)
        .count();
    (host as u64, (table.len() - host) as u64)
}

/// [`holds_exactly`] for a split table, without a copy of it: every entry where it
/// belongs and as wanted, and as many as wanted.
fn holds_split<K: Copy + Ord, V: PartialEq>(
    host: &[(K, V)],
    trie: &[TrieEntry<K, V>],
    wanted: &BTreeMap<(u32, K), V>,
    full_bits: u32,
) -> bool {
    host.len() + trie.len() == wanted.len()
        && host
            .iter()
            .all(|(data, value)| wanted.get(&(full_bits, *data)) == Some(value))
        && trie
            .iter()
            .all(|(key, value)| key.0 != full_bits && wanted.get(key) == Some(value))
}

/// A key set as the map the agent writes it into: each key with value 1.
fn as_set_map<K: Copy + Ord>(keys: &BTreeSet<K>) -> BTreeMap<K, u32> {
    keys.iter().map(|key| (*key, 1)).collect()
}

/// How many entries `actual` has wrong against `wanted`: different, missing or extra.
fn drift<K: Ord, V: PartialEq>(actual: &BTreeMap<K, V>, wanted: &BTreeMap<K, V>) -> u64 {
    let wrong = wanted
        .iter()
        .filter(|(k, v)| actual.get(k) != Some(v))
        .count();
    let extra = actual.keys().filter(|k| !wanted.contains_key(k)).count();
    (wrong + extra) as u64
}

/// Makes the hash map hold `wanted` exactly; how many entries it had wrong.
fn repair_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<u64, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let actual: BTreeMap<K, V> = read_hash(map, name)?.into_iter().collect();
    let wrong = drift(&actual, wanted);
    if wrong > 0 {
        upsert_map(fd_of(map), &actual, wanted, name)?;
        remove_map(fd_of(map), &actual, wanted, name)?;
    }
    Ok(wrong)
}

/// As [`repair_hash`] for an LPM trie, keyed by (prefix length, data).
fn repair_trie<K, V>(
    trie: &mut LpmTrie<MapData, K, V>,
    wanted: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> Result<u64, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let actual: BTreeMap<(u32, K), V> = read_trie(trie, name)?.into_iter().collect();
    let wrong = drift(&actual, wanted);
    if wrong > 0 {
        upsert_trie_map(fd_of(trie), &actual, wanted, name)?;
        remove_trie_map(fd_of(trie), &actual, wanted, name)?;
    }
    Ok(wrong)
}

/// Whether a map's `entries` are `wanted` exactly: a map's keys are distinct, so as
/// many entries, each as wanted, are the same entries.
fn holds_exactly<K: Ord, V: PartialEq>(entries: &[(K, V)], wanted: &BTreeMap<K, V>) -> bool {
    entries.len() == wanted.len()
        && entries
            .iter()
            .all(|(key, value)| wanted.get(key) == Some(value))
}

/// What a hash map holds. An entry removed while the read runs is simply not there.
fn read_hash<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, DatapathError> {
    batch::read(fd_of(map)).map_err(batch_err(name, "bpf_map_lookup_batch"))
}

/// An LPM trie's entry as the tables hold it: (prefix length, data), value.
type TrieEntry<K, V> = ((u32, K), V);

/// What an LPM trie holds, keyed by (prefix length, data).
fn read_trie<K: aya::Pod, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<TrieEntry<K, V>>, DatapathError> {
    let entries: Vec<(LpmKey<K>, V)> =
        batch::read(fd_of(trie)).map_err(batch_err(name, "bpf_map_lookup_batch"))?;
    Ok(entries
        .into_iter()
        .map(|(key, value)| ((key.prefix_len(), key.data()), value))
        .collect())
}
