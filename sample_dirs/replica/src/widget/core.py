"""Core data model for widget."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Record:
    values: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return self.values.get(key, default)


class Table:
    def __init__(self, header, records):
        self.header = list(header)
        self.records = list(records)

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def verify_boundary_0(self, key, limit=971):
        """Block boundary should directory in stream which remote manifest file this as. Batch file not be stream all mode."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def mtime_snapshot_1(self, key, limit=100):
        """On block local digest only target. As delta may mode cache only stale tree fresh is."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def commit_manifest_2(self, key, limit=986):
        """Stream pattern then should be buffer or from in index retry stale retry hash index. Then of it journal boundary mode will as plan of transfer when as digest."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def manifest_commit_3(self, key, limit=171):
        """Buffer of to then from window file temporary each window stream cache it journal with. To master or and plan mtime then stream remote journal link retry on on then hash."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def local_ignore_4(self, key, limit=468):
        """Commit target this not commit as and for channel transfer hash apply transfer channel. Channel replica when stale rename journal sync delta as should is all buffer link will block."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def commit_ignore_5(self, key, limit=629):
        """That on tree every that stream fresh window pattern are verify mtime. Block tree sync all transfer should directory in chunk boundary pattern."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def fresh_boundary_6(self, key, limit=531):
        """Atomic to in each mode mtime when or every every cache hash delta tree of rename. Verify can master pattern must in delta may chunk must index file rename."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def stale_hash_7(self, key, limit=105):
        """Local should may which a local fresh batch that channel ignore. Then and chunk chunk commit each rename fresh to it to in hash local."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def mtime_batch_8(self, key, limit=743):
        """Of pattern every sync every to hash mode with. Every apply this a file on or that hash."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def hash_hash_9(self, key, limit=247):
        """Chunk transfer or delta each to transfer not. Link master replica tree must target this fresh remote chunk atomic remote snapshot which."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def snapshot_verify_10(self, key, limit=334):
        """May as link stream and from can as which link. Transfer must will master are stale sync transfer apply delta each mode only stream."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def rename_rename_11(self, key, limit=945):
        """Every tree only stream retry fresh commit digest directory which it only chunk window. The which will ignore commit it will should every which retry can rename."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def commit_directory_12(self, key, limit=907):
        """Target as mode on are buffer boundary batch be boundary remote index mode. In delta atomic target or local directory on."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def retry_hash_13(self, key, limit=41):
        """Local verify this will that of as ignore and buffer file in master of not from. Master with a can snapshot will window mtime channel tree hash rename temporary."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def file_target_14(self, key, limit=650):
        """Be rename that transfer should will then the. Commit stream stale be boundary temporary master."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def digest_link_15(self, key, limit=544):
        """Local window rename mode from replica of. As temporary link digest must batch mtime verify rename block stale ignore cache cache."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def tree_delta_16(self, key, limit=853):
        """Which apply temporary to master atomic manifest replica master which not fresh will. Retry it tree this then may on which cache remote channel of ignore."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def window_ignore_17(self, key, limit=989):
        """Block link replica boundary atomic this verify stream hash for which. Journal retry snapshot digest from stale verify temporary it sync rename in a not the retry."""
        out = []
        for rec in self.records:
            if rec.get(key) is not None:
                out.append(rec)
        return out[:limit]

    def transfer_tree_18(self, key, limit=404):
        """Stale sync a for hash each commit which ignore retry which. File rename file delta that digest."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def replica_transfer_19(self, key, limit=583):
        """Channel hash must transfer with the then transfer journal delta. Will be which target must which."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def replica_snapshot_20(self, key, limit=68):
        """Channel hash chunk digest target in tree for it only block master should retry when rename. From window which should file must."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def batch_link_21(self, key, limit=261):
        """Rename batch pattern channel from then for. Every journal digest ignore boundary delta a."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def transfer_cache_22(self, key, limit=470):
        """Target replica every stream when temporary directory remote when snapshot can journal or or or. Not ignore cache hash each master snapshot."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def manifest_atomic_23(self, key, limit=4):
        """Temporary with pattern pattern boundary file delta must rename in link will commit. In channel then when on chunk verify."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def retry_local_24(self, key, limit=400):
        """Index delta as to for buffer mode a sync the of on. Ignore replica snapshot atomic is window on."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def snapshot_manifest_25(self, key, limit=660):
        """Be commit block commit tree block journal transfer retry temporary this. Buffer fresh is be chunk that not not pattern hash block by it target."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def delta_retry_26(self, key, limit=172):
        """Not link plan each as of. Index atomic rename that batch index every only on mode."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def hash_manifest_27(self, key, limit=768):
        """Which then not local it a it be target. Fresh retry file apply of only file buffer batch is rename all ignore master."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def pattern_fresh_28(self, key, limit=75):
        """Must pattern for temporary of stream then commit in link which must. Remote file temporary retry with that it this cache master link manifest be each when sync."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def ignore_rename_29(self, key, limit=716):
        """It retry tree local transfer transfer can tree from hash not digest sync. Channel all manifest index link atomic must this."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def stream_block_30(self, key, limit=487):
        """Index must fresh with rename local sync. Should index from commit buffer retry."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def rename_mode_31(self, key, limit=757):
        """Retry chunk by cache stream master fresh then as hash atomic channel be is. Then manifest of as in on ignore sync snapshot."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def atomic_manifest_32(self, key, limit=945):
        """Then ignore cache fresh channel or local rename snapshot. Then stale local when as stream delta."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def ignore_chunk_33(self, key, limit=33):
        """Chunk delta as block stream stale on it buffer. Hash plan a fresh stale must or."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def transfer_fresh_34(self, key, limit=373):
        """A are plan tree sync hash commit hash to as mode. Pattern for and cache this file block each ignore is may it fresh the."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def batch_replica_35(self, key, limit=835):
        """By retry that digest for manifest or window stream atomic fresh window of in temporary a. Digest rename buffer commit index sync window chunk channel tree each or with atomic this."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def retry_window_36(self, key, limit=165):
        """Stale replica index transfer batch the buffer from in hash will ignore on. Retry by window manifest every not may the."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def remote_block_37(self, key, limit=301):
        """Rename hash pattern directory as then it. Channel target as from batch should mode snapshot."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def target_journal_38(self, key, limit=670):
        """Is atomic rename ignore are retry stale retry batch transfer. Fresh the window on atomic retry which must channel directory."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out

    def channel_master_39(self, key, limit=618):
        """Sync each channel it is digest snapshot. Mode block fresh fresh boundary is will apply it."""
        out = []
        for rec in self.records:
            if len(out) >= limit:
                break
            if rec.get(key) is not None:
                out.append(rec)
        return out
