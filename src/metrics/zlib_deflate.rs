//! A Rust port of classic zlib's (1.2.x / 1.3.x) lazy-matching deflate, for PNG sizes that match
//! Pillow byte for byte.
//!
//! Pillow's manylinux wheels do not bundle zlib (`libz.so.1` is on the manylinux whitelist), so
//! `Image.save(format="PNG")` deflates with the system's classic zlib, configured by
//! `ZipEncode.c` as level 6, `Z_FILTERED`, window 15, memLevel 9, fed one filtered scanline per
//! `deflate(Z_NO_FLUSH)` call. Other deflaters (miniz_oxide, zlib-ng and its port zlib-rs) parse
//! differently and miss Pillow's sizes by up to 50% on smooth images, so this module follows
//! zlib's `deflate.c` / `trees.c` step for step: the same hash chains, lazy evaluation, window
//! sliding, block splitting and Huffman tree construction, hence the same bytes.
//! Only the configuration Pillow uses is implemented (level 6 lazy matching, window 15,
//! memLevel 9), with either `Z_FILTERED` or `Z_DEFAULT_STRATEGY`.

const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
const MIN_LOOKAHEAD: usize = MAX_MATCH + MIN_MATCH + 1;
const W_BITS: usize = 15;
const W_SIZE: usize = 1 << W_BITS;
const W_MASK: usize = W_SIZE - 1;
const WINDOW_SIZE: usize = 2 * W_SIZE;
const MAX_DIST: usize = W_SIZE - MIN_LOOKAHEAD;
/// Bytes beyond the data that zlib zero-fills so that `longest_match` never reads uninitialised memory.
const WIN_INIT: usize = MAX_MATCH;
const MEM_LEVEL: usize = 9;
const HASH_BITS: usize = MEM_LEVEL + 7;
const HASH_SIZE: usize = 1 << HASH_BITS;
const HASH_MASK: u32 = (HASH_SIZE - 1) as u32;
const HASH_SHIFT: u32 = HASH_BITS.div_ceil(MIN_MATCH) as u32;
const LIT_BUFSIZE: usize = 1 << (MEM_LEVEL + 6);
const TOO_FAR: usize = 4096;
const NIL: usize = 0;

// Level 6 of zlib's configuration table.
const GOOD_MATCH: usize = 8;
const MAX_LAZY_MATCH: usize = 16;
const NICE_MATCH: usize = 128;
const MAX_CHAIN: usize = 128;

const LENGTH_CODES: usize = 29;
const LITERALS: usize = 256;
const L_CODES: usize = LITERALS + 1 + LENGTH_CODES;
const D_CODES: usize = 30;
const BL_CODES: usize = 19;
const HEAP_SIZE: usize = 2 * L_CODES + 1;
const MAX_BITS: usize = 15;
const MAX_BL_BITS: usize = 7;
const END_BLOCK: usize = 256;
const REP_3_6: usize = 16;
const REPZ_3_10: usize = 17;
const REPZ_11_138: usize = 18;

const EXTRA_LBITS: [u32; LENGTH_CODES] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const EXTRA_DBITS: [u32; D_CODES] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
const EXTRA_BLBITS: [u32; BL_CODES] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7];
const BL_ORDER: [usize; BL_CODES] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// zlib's `strategy` argument, as far as lazy matching distinguishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `Z_DEFAULT_STRATEGY`.
    Default,
    /// `Z_FILTERED`: matches of 5 bytes or less become literals (suits PNG-filtered data).
    Filtered,
}

/// One Huffman tree node; zlib overlays freq/code and dad/len, which it never needs at once.
#[derive(Clone, Copy, Default)]
struct Node {
    freq: u32,
    code: u32,
    dad: usize,
    len: u32,
}

/// Constant tables of `trees.c` (`tr_static_init`).
struct StaticTables {
    ltree: [Node; L_CODES + 2],
    dtree: [Node; D_CODES],
    length_code: [u8; MAX_MATCH - MIN_MATCH + 1],
    dist_code: [u8; 512],
    base_length: [u32; LENGTH_CODES],
    base_dist: [u32; D_CODES],
}

fn bi_reverse(mut code: u32, len: u32) -> u32 {
    let mut res = 0;
    for _ in 0..len {
        res = (res << 1) | (code & 1);
        code >>= 1;
    }
    res
}

/// Canonical codes from bit lengths (`gen_codes`).
fn gen_codes(tree: &mut [Node], max_code: usize, bl_count: &[u32; MAX_BITS + 1]) {
    let mut next_code = [0u32; MAX_BITS + 1];
    let mut code = 0u32;
    for bits in 1..=MAX_BITS {
        code = (code + bl_count[bits - 1]) << 1;
        next_code[bits] = code;
    }
    for node in tree.iter_mut().take(max_code + 1) {
        if node.len != 0 {
            node.code = bi_reverse(next_code[node.len as usize], node.len);
            next_code[node.len as usize] += 1;
        }
    }
}

impl StaticTables {
    fn new() -> Self {
        let mut t = StaticTables {
            ltree: [Node::default(); L_CODES + 2],
            dtree: [Node::default(); D_CODES],
            length_code: [0; MAX_MATCH - MIN_MATCH + 1],
            dist_code: [0; 512],
            base_length: [0; LENGTH_CODES],
            base_dist: [0; D_CODES],
        };
        let mut length = 0usize;
        for (code, &extra) in EXTRA_LBITS.iter().enumerate().take(LENGTH_CODES - 1) {
            t.base_length[code] = length as u32;
            for _ in 0..(1 << extra) {
                t.length_code[length] = code as u8;
                length += 1;
            }
        }
        // Match length 258 has two encodings; zlib uses the shorter code 285.
        t.length_code[length - 1] = (LENGTH_CODES - 1) as u8;
        let mut dist = 0usize;
        for (code, &extra) in EXTRA_DBITS.iter().enumerate().take(16) {
            t.base_dist[code] = dist as u32;
            for _ in 0..(1 << extra) {
                t.dist_code[dist] = code as u8;
                dist += 1;
            }
        }
        dist >>= 7;
        for (code, &extra) in EXTRA_DBITS.iter().enumerate().skip(16) {
            t.base_dist[code] = (dist << 7) as u32;
            for _ in 0..(1 << (extra - 7)) {
                t.dist_code[256 + dist] = code as u8;
                dist += 1;
            }
        }
        let mut bl_count = [0u32; MAX_BITS + 1];
        for (n, node) in t.ltree.iter_mut().enumerate() {
            node.len = match n {
                0..=143 => 8,
                144..=255 => 9,
                256..=279 => 7,
                _ => 8,
            };
            bl_count[node.len as usize] += 1;
        }
        gen_codes(&mut t.ltree, L_CODES + 1, &bl_count);
        for (n, node) in t.dtree.iter_mut().enumerate() {
            node.len = 5;
            node.code = bi_reverse(n as u32, 5);
        }
        t
    }

    fn d_code(&self, dist: usize) -> usize {
        if dist < 256 {
            self.dist_code[dist] as usize
        } else {
            self.dist_code[256 + (dist >> 7)] as usize
        }
    }
}

/// Which tree a descriptor builds: its static counterpart, extra bits and limits (`static_tree_desc`).
#[derive(Clone, Copy)]
enum TreeKind {
    Literal,
    Distance,
    BitLength,
}

impl TreeKind {
    fn elems(self) -> usize {
        match self {
            TreeKind::Literal => L_CODES,
            TreeKind::Distance => D_CODES,
            TreeKind::BitLength => BL_CODES,
        }
    }

    fn max_length(self) -> u32 {
        match self {
            TreeKind::BitLength => MAX_BL_BITS as u32,
            _ => MAX_BITS as u32,
        }
    }

    fn extra_bits(self, n: usize) -> u32 {
        match self {
            TreeKind::Literal if n > LITERALS => EXTRA_LBITS[n - LITERALS - 1],
            TreeKind::Literal => 0,
            TreeKind::Distance => EXTRA_DBITS[n],
            TreeKind::BitLength => EXTRA_BLBITS[n],
        }
    }
}

/// Bits written LSB first, as zlib's `send_bits` / `bi_windup`.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    buf: u64,
    count: u32,
}

impl BitWriter {
    fn send(&mut self, value: u32, len: u32) {
        self.buf |= (value as u64) << self.count;
        self.count += len;
        while self.count >= 8 {
            self.out.push(self.buf as u8);
            self.buf >>= 8;
            self.count -= 8;
        }
    }

    fn windup(&mut self) {
        if self.count > 0 {
            self.out.push(self.buf as u8);
        }
        self.buf = 0;
        self.count = 0;
    }
}

/// The deflate state of one zlib stream (`deflate_state`).
struct Deflater<'a> {
    filtered: bool,
    tables: StaticTables,
    window: Vec<u8>,
    high_water: usize,
    head: Vec<u16>,
    prev: Vec<u16>,
    ins_h: u32,
    strstart: usize,
    block_start: isize,
    lookahead: usize,
    insert: usize,
    match_length: usize,
    prev_length: usize,
    match_available: bool,
    match_start: usize,
    prev_match: usize,
    input: &'a [u8],
    avail_in: usize,
    /// Pending symbols of the current block: (distance, literal or length - MIN_MATCH).
    syms: Vec<(u16, u8)>,
    dyn_ltree: [Node; HEAP_SIZE],
    dyn_dtree: [Node; 2 * D_CODES + 1],
    bl_tree: [Node; 2 * BL_CODES + 1],
    l_max_code: usize,
    d_max_code: usize,
    heap: [usize; HEAP_SIZE],
    heap_len: usize,
    heap_max: usize,
    depth: [u8; HEAP_SIZE],
    bl_count: [u32; MAX_BITS + 1],
    /// Bit lengths of the block with the dynamic and the static trees (signed like zlib's
    /// running sums, which dip below zero when `build_tree` forces codes).
    opt_len: i64,
    static_len: i64,
    bits: BitWriter,
}

#[derive(PartialEq)]
enum Flush {
    None,
    Finish,
}

impl<'a> Deflater<'a> {
    fn new(strategy: Strategy) -> Self {
        let mut d = Deflater {
            filtered: strategy == Strategy::Filtered,
            tables: StaticTables::new(),
            window: vec![0; WINDOW_SIZE],
            high_water: 0,
            head: vec![0; HASH_SIZE],
            prev: vec![0; W_SIZE],
            ins_h: 0,
            strstart: 0,
            block_start: 0,
            lookahead: 0,
            insert: 0,
            match_length: MIN_MATCH - 1,
            prev_length: MIN_MATCH - 1,
            match_available: false,
            match_start: 0,
            prev_match: 0,
            input: &[],
            avail_in: 0,
            syms: Vec::with_capacity(LIT_BUFSIZE),
            dyn_ltree: [Node::default(); HEAP_SIZE],
            dyn_dtree: [Node::default(); 2 * D_CODES + 1],
            bl_tree: [Node::default(); 2 * BL_CODES + 1],
            l_max_code: 0,
            d_max_code: 0,
            heap: [0; HEAP_SIZE],
            heap_len: 0,
            heap_max: 0,
            depth: [0; HEAP_SIZE],
            bl_count: [0; MAX_BITS + 1],
            opt_len: 0,
            static_len: 0,
            bits: BitWriter::default(),
        };
        d.init_block();
        d
    }

    fn update_hash(&mut self, c: u8) {
        self.ins_h = ((self.ins_h << HASH_SHIFT) ^ c as u32) & HASH_MASK;
    }

    /// `INSERT_STRING`: hash the string at `pos` into the chains, returning the previous head.
    fn insert_string(&mut self, pos: usize) -> usize {
        self.update_hash(self.window[pos + MIN_MATCH - 1]);
        let head = self.head[self.ins_h as usize];
        self.prev[pos & W_MASK] = head;
        self.head[self.ins_h as usize] = pos as u16;
        head as usize
    }

    fn slide_hash(&mut self) {
        for entry in self.head.iter_mut().chain(self.prev.iter_mut()) {
            let m = *entry as usize;
            *entry = if m >= W_SIZE {
                (m - W_SIZE) as u16
            } else {
                NIL as u16
            };
        }
    }

    fn fill_window(&mut self) {
        loop {
            let mut more = WINDOW_SIZE - self.lookahead - self.strstart;
            if self.strstart >= W_SIZE + MAX_DIST {
                self.window.copy_within(W_SIZE..W_SIZE + (W_SIZE - more), 0);
                self.match_start = self.match_start.wrapping_sub(W_SIZE);
                self.strstart -= W_SIZE;
                self.block_start -= W_SIZE as isize;
                if self.insert > self.strstart {
                    self.insert = self.strstart;
                }
                self.slide_hash();
                more += W_SIZE;
            }
            if self.avail_in == 0 {
                break;
            }
            let n = self.avail_in.min(more);
            let start = self.input.len() - self.avail_in;
            let dst = self.strstart + self.lookahead;
            self.window[dst..dst + n].copy_from_slice(&self.input[start..start + n]);
            self.avail_in -= n;
            self.lookahead += n;
            if self.lookahead + self.insert >= MIN_MATCH {
                let mut pos = self.strstart - self.insert;
                self.ins_h = self.window[pos] as u32;
                self.update_hash(self.window[pos + 1]);
                while self.insert > 0 {
                    self.update_hash(self.window[pos + MIN_MATCH - 1]);
                    self.prev[pos & W_MASK] = self.head[self.ins_h as usize];
                    self.head[self.ins_h as usize] = pos as u16;
                    pos += 1;
                    self.insert -= 1;
                    if self.lookahead + self.insert < MIN_MATCH {
                        break;
                    }
                }
            }
            if !(self.lookahead < MIN_LOOKAHEAD && self.avail_in != 0) {
                break;
            }
        }
        // Zero WIN_INIT bytes past the data, exactly as zlib does: longest_match may read them.
        if self.high_water < WINDOW_SIZE {
            let curr = self.strstart + self.lookahead;
            if self.high_water < curr {
                let init = (WINDOW_SIZE - curr).min(WIN_INIT);
                self.window[curr..curr + init].fill(0);
                self.high_water = curr + init;
            } else if self.high_water < curr + WIN_INIT {
                let init = (curr + WIN_INIT - self.high_water).min(WINDOW_SIZE - self.high_water);
                self.window[self.high_water..self.high_water + init].fill(0);
                self.high_water += init;
            }
        }
    }

    fn longest_match(&mut self, mut cur_match: usize) -> usize {
        let mut chain_length = MAX_CHAIN;
        let scan = self.strstart;
        let mut best_len = self.prev_length;
        let mut nice_match = NICE_MATCH;
        let limit = if self.strstart > MAX_DIST {
            self.strstart - MAX_DIST
        } else {
            NIL
        };
        let w = &self.window;
        let mut scan_end1 = w[scan + best_len - 1];
        let mut scan_end = w[scan + best_len];
        if self.prev_length >= GOOD_MATCH {
            chain_length >>= 2;
        }
        if nice_match > self.lookahead {
            nice_match = self.lookahead;
        }
        loop {
            let m = cur_match;
            if w[m + best_len] == scan_end
                && w[m + best_len - 1] == scan_end1
                && w[m] == w[scan]
                && w[m + 1] == w[scan + 1]
            {
                // zlib compares from offset 2 in unrolled steps of 8 bytes, checking the end
                // only between steps; up to MAX_MATCH bytes match in total.
                let mut len = 2;
                while len < MAX_MATCH && w[scan + len] == w[m + len] {
                    len += 1;
                }
                if len > best_len {
                    self.match_start = cur_match;
                    best_len = len;
                    if len >= nice_match {
                        break;
                    }
                    scan_end1 = w[scan + best_len - 1];
                    scan_end = w[scan + best_len];
                }
            }
            cur_match = self.prev[cur_match & W_MASK] as usize;
            chain_length -= 1;
            if cur_match <= limit || chain_length == 0 {
                break;
            }
        }
        best_len.min(self.lookahead)
    }

    fn tally_lit(&mut self, c: u8) -> bool {
        self.syms.push((0, c));
        self.dyn_ltree[c as usize].freq += 1;
        self.syms.len() == LIT_BUFSIZE - 1
    }

    fn tally_dist(&mut self, dist: usize, len: usize) -> bool {
        self.syms.push((dist as u16, len as u8));
        let lcode = self.tables.length_code[len] as usize;
        self.dyn_ltree[lcode + LITERALS + 1].freq += 1;
        let dcode = self.tables.d_code(dist - 1);
        self.dyn_dtree[dcode].freq += 1;
        self.syms.len() == LIT_BUFSIZE - 1
    }

    /// `FLUSH_BLOCK_ONLY`: the stored alternative exists only while the block is in the window.
    fn flush_block(&mut self, last: bool) {
        let stored_len = (self.strstart as isize - self.block_start) as usize;
        let stored = (self.block_start >= 0).then_some(self.block_start as usize);
        self.tr_flush_block(stored, stored_len, last);
        self.block_start = self.strstart as isize;
    }

    /// `deflate_slow`; returns when it needs more input (or, with `Flush::Finish`, when done).
    fn deflate_slow(&mut self, flush: Flush) {
        loop {
            if self.lookahead < MIN_LOOKAHEAD {
                self.fill_window();
                if self.lookahead < MIN_LOOKAHEAD && flush == Flush::None {
                    return;
                }
                if self.lookahead == 0 {
                    break;
                }
            }
            let mut hash_head = NIL;
            if self.lookahead >= MIN_MATCH {
                hash_head = self.insert_string(self.strstart);
            }
            self.prev_length = self.match_length;
            self.prev_match = self.match_start;
            self.match_length = MIN_MATCH - 1;
            if hash_head != NIL
                && self.prev_length < MAX_LAZY_MATCH
                && self.strstart - hash_head <= MAX_DIST
            {
                self.match_length = self.longest_match(hash_head);
                if self.match_length <= 5
                    && (self.filtered
                        || (self.match_length == MIN_MATCH
                            && self.strstart - self.match_start > TOO_FAR))
                {
                    self.match_length = MIN_MATCH - 1;
                }
            }
            if self.prev_length >= MIN_MATCH && self.match_length <= self.prev_length {
                let max_insert = self.strstart + self.lookahead - MIN_MATCH;
                let bflush = self.tally_dist(
                    self.strstart - 1 - self.prev_match,
                    self.prev_length - MIN_MATCH,
                );
                self.lookahead -= self.prev_length - 1;
                self.prev_length -= 2;
                loop {
                    self.strstart += 1;
                    if self.strstart <= max_insert {
                        self.insert_string(self.strstart);
                    }
                    self.prev_length -= 1;
                    if self.prev_length == 0 {
                        break;
                    }
                }
                self.match_available = false;
                self.match_length = MIN_MATCH - 1;
                self.strstart += 1;
                if bflush {
                    self.flush_block(false);
                }
            } else if self.match_available {
                if self.tally_lit(self.window[self.strstart - 1]) {
                    self.flush_block(false);
                }
                self.strstart += 1;
                self.lookahead -= 1;
            } else {
                self.match_available = true;
                self.strstart += 1;
                self.lookahead -= 1;
            }
        }
        if self.match_available {
            self.tally_lit(self.window[self.strstart - 1]);
            self.match_available = false;
        }
        self.insert = self.strstart.min(MIN_MATCH - 1);
        self.flush_block(true);
    }

    // ---- trees.c ----

    fn init_block(&mut self) {
        for n in self.dyn_ltree.iter_mut().take(L_CODES) {
            n.freq = 0;
        }
        for n in self.dyn_dtree.iter_mut().take(D_CODES) {
            n.freq = 0;
        }
        for n in self.bl_tree.iter_mut().take(BL_CODES) {
            n.freq = 0;
        }
        self.dyn_ltree[END_BLOCK].freq = 1;
        self.opt_len = 0;
        self.static_len = 0;
        self.syms.clear();
    }

    fn tree_mut(&mut self, kind: TreeKind) -> &mut [Node] {
        match kind {
            TreeKind::Literal => &mut self.dyn_ltree,
            TreeKind::Distance => &mut self.dyn_dtree,
            TreeKind::BitLength => &mut self.bl_tree,
        }
    }

    fn static_len_of(&self, kind: TreeKind, n: usize) -> Option<u32> {
        match kind {
            TreeKind::Literal => Some(self.tables.ltree[n].len),
            TreeKind::Distance => Some(self.tables.dtree[n].len),
            TreeKind::BitLength => None,
        }
    }

    /// `smaller`: frequency order, ties broken by depth.
    fn smaller(tree: &[Node], depth: &[u8], n: usize, m: usize) -> bool {
        tree[n].freq < tree[m].freq || (tree[n].freq == tree[m].freq && depth[n] <= depth[m])
    }

    fn pqdownheap(&mut self, kind: TreeKind, mut k: usize) {
        let heap_len = self.heap_len;
        let v = self.heap[k];
        let mut j = k << 1;
        let (heap, depth) = (&mut self.heap, &self.depth);
        let tree: &[Node] = match kind {
            TreeKind::Literal => &self.dyn_ltree,
            TreeKind::Distance => &self.dyn_dtree,
            TreeKind::BitLength => &self.bl_tree,
        };
        while j <= heap_len {
            if j < heap_len && Self::smaller(tree, depth, heap[j + 1], heap[j]) {
                j += 1;
            }
            if Self::smaller(tree, depth, v, heap[j]) {
                break;
            }
            heap[k] = heap[j];
            k = j;
            j <<= 1;
        }
        heap[k] = v;
    }

    fn gen_bitlen(&mut self, kind: TreeKind, max_code: usize) {
        let max_length = kind.max_length();
        self.bl_count = [0; MAX_BITS + 1];
        let root = self.heap[self.heap_max];
        self.tree_mut(kind)[root].len = 0;
        let mut overflow = 0i32;
        for h in self.heap_max + 1..HEAP_SIZE {
            let n = self.heap[h];
            let tree = self.tree_mut(kind);
            let mut bits = tree[tree[n].dad].len + 1;
            if bits > max_length {
                bits = max_length;
                overflow += 1;
            }
            tree[n].len = bits;
            if n > max_code {
                continue;
            }
            let f = tree[n].freq as i64;
            self.bl_count[bits as usize] += 1;
            let xbits = kind.extra_bits(n);
            self.opt_len += f * (bits + xbits) as i64;
            if let Some(slen) = self.static_len_of(kind, n) {
                self.static_len += f * (slen + xbits) as i64;
            }
        }
        if overflow == 0 {
            return;
        }
        while overflow > 0 {
            let mut bits = max_length as usize - 1;
            while self.bl_count[bits] == 0 {
                bits -= 1;
            }
            self.bl_count[bits] -= 1;
            self.bl_count[bits + 1] += 2;
            self.bl_count[max_length as usize] -= 1;
            overflow -= 2;
        }
        let mut h = HEAP_SIZE;
        for bits in (1..=max_length).rev() {
            let mut n = self.bl_count[bits as usize];
            while n != 0 {
                h -= 1;
                let m = self.heap[h];
                if m > max_code {
                    continue;
                }
                let tree = self.tree_mut(kind);
                if tree[m].len != bits {
                    let delta = (bits as i64 - tree[m].len as i64) * tree[m].freq as i64;
                    tree[m].len = bits;
                    self.opt_len += delta;
                }
                n -= 1;
            }
        }
    }

    /// `build_tree`: returns max_code (largest code with non-zero frequency).
    fn build_tree(&mut self, kind: TreeKind) -> usize {
        let elems = kind.elems();
        let mut max_code: isize = -1;
        self.heap_len = 0;
        self.heap_max = HEAP_SIZE;
        for n in 0..elems {
            if self.tree_mut(kind)[n].freq != 0 {
                self.heap_len += 1;
                self.heap[self.heap_len] = n;
                max_code = n as isize;
                self.depth[n] = 0;
            } else {
                self.tree_mut(kind)[n].len = 0;
            }
        }
        // Force at least two codes of non-zero frequency.
        while self.heap_len < 2 {
            let node = if max_code < 2 {
                max_code += 1;
                max_code as usize
            } else {
                0
            };
            self.heap_len += 1;
            self.heap[self.heap_len] = node;
            self.tree_mut(kind)[node].freq = 1;
            self.depth[node] = 0;
            self.opt_len -= 1;
            if let Some(slen) = self.static_len_of(kind, node) {
                self.static_len -= slen as i64;
            }
        }
        let max_code = max_code as usize;
        for n in (1..=self.heap_len / 2).rev() {
            self.pqdownheap(kind, n);
        }
        let mut node = elems;
        loop {
            let n = self.heap[1];
            self.heap[1] = self.heap[self.heap_len];
            self.heap_len -= 1;
            self.pqdownheap(kind, 1);
            let m = self.heap[1];
            self.heap_max -= 1;
            self.heap[self.heap_max] = n;
            self.heap_max -= 1;
            self.heap[self.heap_max] = m;
            let depth = self.depth[n].max(self.depth[m]) + 1;
            let tree = self.tree_mut(kind);
            tree[node].freq = tree[n].freq + tree[m].freq;
            tree[n].dad = node;
            tree[m].dad = node;
            self.depth[node] = depth;
            self.heap[1] = node;
            node += 1;
            self.pqdownheap(kind, 1);
            if self.heap_len < 2 {
                break;
            }
        }
        self.heap_max -= 1;
        self.heap[self.heap_max] = self.heap[1];
        self.gen_bitlen(kind, max_code);
        let bl_count = self.bl_count;
        gen_codes(self.tree_mut(kind), max_code, &bl_count);
        max_code
    }

    /// `build_bl_tree`: the bit-length tree for both trees; returns the index in `BL_ORDER`
    /// of the last bit-length code to send.
    fn build_bl_tree(&mut self) -> usize {
        let lens = |tree: &[Node], max_code: usize| {
            tree[..=max_code].iter().map(|n| n.len).collect::<Vec<_>>()
        };
        let symbols = [
            length_symbols(&lens(&self.dyn_ltree, self.l_max_code)),
            length_symbols(&lens(&self.dyn_dtree, self.d_max_code)),
        ];
        for &(code, _, _) in symbols.iter().flatten() {
            self.bl_tree[code].freq += 1;
        }
        self.build_tree(TreeKind::BitLength);
        let mut max_blindex = BL_CODES - 1;
        while max_blindex >= 3 && self.bl_tree[BL_ORDER[max_blindex]].len == 0 {
            max_blindex -= 1;
        }
        self.opt_len += 3 * (max_blindex as i64 + 1) + 5 + 5 + 4;
        max_blindex
    }

    fn send_all_trees(&mut self, lcodes: usize, dcodes: usize, blcodes: usize) {
        self.bits.send((lcodes - 257) as u32, 5);
        self.bits.send((dcodes - 1) as u32, 5);
        self.bits.send((blcodes - 4) as u32, 4);
        for &code in &BL_ORDER[..blcodes] {
            self.bits.send(self.bl_tree[code].len, 3);
        }
        for (tree, codes) in [
            (&self.dyn_ltree[..lcodes], lcodes),
            (&self.dyn_dtree[..dcodes], dcodes),
        ] {
            let lens: Vec<u32> = tree.iter().map(|n| n.len).collect();
            debug_assert_eq!(lens.len(), codes);
            for (code, extra, extra_bits) in length_symbols(&lens) {
                self.bits
                    .send(self.bl_tree[code].code, self.bl_tree[code].len);
                if extra_bits > 0 {
                    self.bits.send(extra, extra_bits);
                }
            }
        }
    }

    fn compress_block(&mut self, use_static: bool) {
        let (ltree, dtree): (&[Node], &[Node]) = if use_static {
            (&self.tables.ltree, &self.tables.dtree)
        } else {
            (&self.dyn_ltree, &self.dyn_dtree)
        };
        let t = &self.tables;
        for &(dist, lc) in &self.syms {
            if dist == 0 {
                self.bits
                    .send(ltree[lc as usize].code, ltree[lc as usize].len);
                continue;
            }
            let code = t.length_code[lc as usize] as usize;
            self.bits.send(
                ltree[code + LITERALS + 1].code,
                ltree[code + LITERALS + 1].len,
            );
            if EXTRA_LBITS[code] != 0 {
                self.bits
                    .send(lc as u32 - t.base_length[code], EXTRA_LBITS[code]);
            }
            let dist = dist as usize - 1;
            let code = t.d_code(dist);
            self.bits.send(dtree[code].code, dtree[code].len);
            if EXTRA_DBITS[code] != 0 {
                self.bits
                    .send(dist as u32 - t.base_dist[code], EXTRA_DBITS[code]);
            }
        }
        self.bits.send(ltree[END_BLOCK].code, ltree[END_BLOCK].len);
    }

    /// `_tr_flush_block`: stored, static or dynamic, whichever is smallest (ties as zlib).
    fn tr_flush_block(&mut self, stored_start: Option<usize>, stored_len: usize, last: bool) {
        self.l_max_code = self.build_tree(TreeKind::Literal);
        self.d_max_code = self.build_tree(TreeKind::Distance);
        let max_blindex = self.build_bl_tree();
        let mut opt_lenb = ((self.opt_len + 3 + 7) >> 3) as usize;
        let static_lenb = ((self.static_len + 3 + 7) >> 3) as usize;
        if static_lenb <= opt_lenb {
            opt_lenb = static_lenb;
        }
        match stored_start {
            Some(start) if stored_len + 4 <= opt_lenb => {
                self.bits.send(last as u32, 3); // STORED_BLOCK = 0
                self.bits.windup();
                self.bits
                    .out
                    .extend_from_slice(&(stored_len as u16).to_le_bytes());
                self.bits
                    .out
                    .extend_from_slice(&(!(stored_len as u16)).to_le_bytes());
                self.bits
                    .out
                    .extend_from_slice(&self.window[start..start + stored_len]);
            }
            _ if static_lenb == opt_lenb => {
                self.bits.send((1 << 1) + last as u32, 3); // STATIC_TREES
                self.compress_block(true);
            }
            _ => {
                self.bits.send((2 << 1) + last as u32, 3); // DYN_TREES
                self.send_all_trees(self.l_max_code + 1, self.d_max_code + 1, max_blindex + 1);
                self.compress_block(false);
            }
        }
        self.init_block();
        if last {
            self.bits.windup();
        }
    }
}

/// The bit-length codes describing a tree's code lengths (`scan_tree` / `send_tree`):
/// (code, extra value, extra bits) with runs as REP_3_6, REPZ_3_10 and REPZ_11_138.
fn length_symbols(lens: &[u32]) -> Vec<(usize, u32, u32)> {
    const GUARD: u32 = 0xffff; // zlib stores this past max_code
    let mut out = Vec::new();
    let mut prevlen = u32::MAX;
    let mut nextlen = lens[0];
    let mut count = 0u32;
    let (mut max_count, mut min_count) = if nextlen == 0 { (138, 3) } else { (7, 4) };
    for n in 0..lens.len() {
        let curlen = nextlen;
        nextlen = lens.get(n + 1).copied().unwrap_or(GUARD);
        count += 1;
        if count < max_count && curlen == nextlen {
            continue;
        } else if count < min_count {
            out.extend(std::iter::repeat_n((curlen as usize, 0, 0), count as usize));
        } else if curlen != 0 {
            if curlen != prevlen {
                out.push((curlen as usize, 0, 0));
                count -= 1;
            }
            out.push((REP_3_6, count - 3, 2));
        } else if count <= 10 {
            out.push((REPZ_3_10, count - 3, 3));
        } else {
            out.push((REPZ_11_138, count - 11, 7));
        }
        count = 0;
        prevlen = curlen;
        (max_count, min_count) = if nextlen == 0 {
            (138, 3)
        } else if curlen == nextlen {
            (6, 3)
        } else {
            (7, 4)
        };
    }
    out
}

fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += byte as u32;
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// A zlib stream (RFC 1950) of `data`, deflated at level 6 like zlib 1.2/1.3 with
/// `deflateInit2(6, Z_DEFLATED, 15, 9, strategy)`, the input handed to `deflate(Z_NO_FLUSH)` in
/// pieces of `feed` bytes (Pillow: one filtered scanline per call), then `deflate(Z_FINISH)`.
pub fn zlib_level6(data: &[u8], feed: usize, strategy: Strategy) -> Vec<u8> {
    let mut d = Deflater::new(strategy);
    // CMF 0x78 (deflate, 32K window), FLG with FLEVEL 2 (level 6) and the FCHECK bits.
    let header: u16 = ((8 + ((W_BITS as u16 - 8) << 4)) << 8) | (2 << 6);
    let header = header + 31 - header % 31;
    d.bits.out.extend_from_slice(&header.to_be_bytes());
    for piece in data.chunks(feed.max(1)) {
        d.input = piece;
        d.avail_in = piece.len();
        d.deflate_slow(Flush::None);
    }
    d.input = &[];
    d.avail_in = 0;
    d.deflate_slow(Flush::Finish);
    let mut out = std::mem::take(&mut d.bits.out);
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(z: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(z)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_varied_data() {
        let mut text = Vec::new();
        for i in 0..20000 {
            text.extend_from_slice(format!("row {} value {} ", i % 97, (i * 7) % 13).as_bytes());
        }
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![42],
            vec![7; 100_000],
            pseudo_random(70_000, 1),
            text,
            (0..200_000u32).map(|i| ((i / 3) % 251) as u8).collect(),
        ];
        for data in &cases {
            for strategy in [Strategy::Default, Strategy::Filtered] {
                for feed in [97, 1 << 20] {
                    let z = zlib_level6(data, feed, strategy);
                    assert_eq!(&z[..2], &[0x78, 0x9c]);
                    assert_eq!(
                        &inflate(&z),
                        data,
                        "len {} feed {feed} {strategy:?}",
                        data.len()
                    );
                }
            }
        }
    }

    #[test]
    fn known_adler32() {
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
