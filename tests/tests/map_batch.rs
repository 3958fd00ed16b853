//! The agent's batched map calls (`BPF_MAP_*_BATCH`, which write, read and remove every
//! commit's entries) against the kernel's view entry by entry, on an LPM trie of nested
//! prefixes and on a hash map, across several batches.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd,
};

use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key as LpmKey, HashMap, IterableMap, LpmTrie, MapData},
    EbpfLoader,
};
use dataplane_abi::{map_names, FdbEntry, FdbKey, RemoteKey4, REMOTE_FIXED_BITS};
use dataplane_agent::kernel::{datapath::batch, BPF_OBJECT};

/// More than two batches of the agent's calls.
const ENTRIES: usize = 20_000;

fn remote_key(i: usize) -> (u32, RemoteKey4) {
    // Four nested prefixes (/8 to /32) around each address: a read that looked entries
    // up by longest match would return the /32's value for all four.
    let bits = [8u32, 16, 24, 32][i % 4];
    let addr = u32::from_be_bytes([10, (i / 4 % 250) as u8, (i / 1000) as u8, 7]);
    let masked = addr & (u32::MAX << (32 - bits));
    (
        REMOTE_FIXED_BITS + bits,
        RemoteKey4 {
            policy_id: (i / 4) as u32,
            direction: (i % 2) as u8,
            _pad: [0; 3],
            addr: masked.to_be_bytes(),
        },
    )
}

fn fdb_key(i: usize) -> FdbKey {
    let [a, b, c, d] = (i as u32).to_be_bytes();
    FdbKey {
        network_slot: (i % 7) as u32 + 1,
        mac: [0xfa, 0x16, a, b, c, d],
        _pad: [0; 2],
    }
}

/// Every third key to remove, and five that are not there (first, last, two in a row,
/// and one in the middle): they are counted as gone, and the rest still removed.
fn removals<K: Copy>(keys: &[K], absent: [K; 5]) -> (Vec<K>, BTreeSet<usize>) {
    let removed: BTreeSet<usize> = (0..keys.len()).step_by(3).collect();
    let mut list: Vec<K> = removed.iter().map(|&i| keys[i]).collect();
    let middle = list.len() / 2;
    list.insert(0, absent[0]);
    list.insert(middle, absent[1]);
    list.insert(middle + 1, absent[2]);
    list.insert(middle + 2, absent[3]);
    list.push(absent[4]);
    (list, removed)
}

#[test]
fn batched_calls_on_a_trie_agree_with_the_kernel_entry_by_entry() -> Result<()> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::SG_REMOTE4, 2 * ENTRIES as u32)
        .load(BPF_OBJECT)
        .context("loading the BPF object")?;
    let map = ebpf
        .map_mut(map_names::SG_REMOTE4)
        .context("no SG_REMOTE4")?;
    let trie: LpmTrie<&mut MapData, RemoteKey4, u32> = LpmTrie::try_from(map)?;
    let fd = trie.map().fd().as_fd();

    let wanted: BTreeMap<(u32, RemoteKey4), u32> =
        (0..ENTRIES).map(|i| (remote_key(i), i as u32)).collect();
    ensure!(wanted.len() == ENTRIES, "the test's keys are not distinct");
    let entries: Vec<(LpmKey<RemoteKey4>, u32)> = wanted
        .iter()
        .map(|((len, data), value)| (LpmKey::new(*len, *data), *value))
        .collect();
    batch::update(fd, &entries)?;

    let by_entry = |trie: &LpmTrie<&mut MapData, RemoteKey4, u32>| -> Result<BTreeMap<_, _>> {
        Ok(trie
            .iter()
            .map(|entry| entry.map(|(key, value)| ((key.prefix_len(), key.data()), value)))
            .collect::<Result<_, _>>()?)
    };
    ensure!(
        by_entry(&trie)? == wanted,
        "the kernel does not hold what was written"
    );
    let read = batch::read::<LpmKey<RemoteKey4>, u32>(fd)?;
    ensure!(
        read.len() == ENTRIES,
        "{} entries read, not {ENTRIES}",
        read.len()
    );
    let read: BTreeMap<_, _> = read
        .into_iter()
        .map(|(key, value)| ((key.prefix_len(), key.data()), value))
        .collect();
    ensure!(
        read == wanted,
        "the batched read differs from the kernel's entries"
    );

    let keys: Vec<LpmKey<RemoteKey4>> = entries.iter().map(|(key, _)| *key).collect();
    let absent = [0, 1, 2, 3, 4].map(|i| {
        let (len, mut data) = remote_key(i);
        data.policy_id = 1_000_000 + i as u32;
        LpmKey::new(len, data)
    });
    let (list, removed) = removals(&keys, absent);
    let gone = batch::delete(fd, &list)?;
    ensure!(gone == 5, "{gone} keys counted as already gone, not 5");
    let left: BTreeMap<_, _> = wanted
        .iter()
        .enumerate()
        .filter(|(i, _)| !removed.contains(i))
        .map(|(_, (key, value))| (*key, *value))
        .collect();
    ensure!(
        by_entry(&trie)? == left,
        "the removal left other entries than it should"
    );
    Ok(())
}

#[test]
fn batched_calls_on_a_hash_map_agree_with_the_kernel_entry_by_entry() -> Result<()> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::FDB, 2 * ENTRIES as u32)
        .load(BPF_OBJECT)
        .context("loading the BPF object")?;
    let map = ebpf.map_mut(map_names::FDB).context("no FDB")?;
    let fdb: HashMap<&mut MapData, FdbKey, FdbEntry> = HashMap::try_from(map)?;
    let fd = fdb.map().fd().as_fd();

    let entries: Vec<(FdbKey, FdbEntry)> = (0..ENTRIES)
        .map(|i| {
            let entry = FdbEntry {
                ifindex: i as u32 + 100,
                port_slot: (i % 4000) as u32 + 1,
                flags: (i % 2) as u32,
            };
            (fdb_key(i), entry)
        })
        .collect();
    let wanted: BTreeMap<FdbKey, FdbEntry> = entries.iter().copied().collect();
    batch::update(fd, &entries)?;
    // Written again with other values: an update replaces.
    let replaced: Vec<(FdbKey, FdbEntry)> = entries
        .iter()
        .take(10)
        .map(|(key, entry)| (*key, FdbEntry { flags: 7, ..*entry }))
        .collect();
    batch::update(fd, &replaced)?;
    let wanted: BTreeMap<FdbKey, FdbEntry> = wanted.into_iter().chain(replaced).collect();

    let by_entry = |fdb: &HashMap<&mut MapData, FdbKey, FdbEntry>| -> Result<BTreeMap<_, _>> {
        Ok(fdb.iter().collect::<Result<_, _>>()?)
    };
    ensure!(
        by_entry(&fdb)? == wanted,
        "the kernel does not hold what was written"
    );
    let read = batch::read::<FdbKey, FdbEntry>(fd)?;
    ensure!(
        read.len() == ENTRIES,
        "{} entries read, not {ENTRIES}",
        read.len()
    );
    ensure!(
        read.into_iter().collect::<BTreeMap<_, _>>() == wanted,
        "the batched read differs from the kernel's entries"
    );

    let keys: Vec<FdbKey> = entries.iter().map(|(key, _)| *key).collect();
    let absent = [0, 1, 2, 3, 4].map(|i| fdb_key(ENTRIES + i));
    let (list, removed) = removals(&keys, absent);
    let gone = batch::delete(fd, &list)?;
    ensure!(gone == 5, "{gone} keys counted as already gone, not 5");
    let removed: BTreeSet<FdbKey> = removed.into_iter().map(|i| keys[i]).collect();
    let left: BTreeMap<_, _> = wanted
        .iter()
        .filter(|(key, _)| !removed.contains(*key))
        .map(|(key, value)| (*key, *value))
        .collect();
    ensure!(
        by_entry(&fdb)? == left,
        "the removal left other entries than it should"
    );
    Ok(())
}
