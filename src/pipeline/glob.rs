//! Glob patterns over stage ids: `*` matches within one `/` part, `**` across parts, `?` one
//! character.

/// Whether `s` contains glob syntax.
pub fn is_pattern(s: &str) -> bool {
    s.contains('*') || s.contains('?')
}

/// Whether `text` matches `pattern` as a whole.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // memo[i][j]: pattern[i..] against text[j..]; patterns are short, texts are stage ids.
    let mut memo = vec![vec![None; t.len() + 1]; p.len() + 1];
    match_at(&p, &t, 0, 0, &mut memo)
}

fn match_at(p: &[char], t: &[char], i: usize, j: usize, memo: &mut Vec<Vec<Option<bool>>>) -> bool {
    if let Some(known) = memo[i][j] {
        return known;
    }
    let result = if i == p.len() {
        j == t.len()
    } else if p[i] == '*' {
        let across = p.get(i + 1) == Some(&'*');
        let next = if across { i + 2 } else { i + 1 };
        let mut k = j;
        loop {
            if match_at(p, t, next, k, memo) {
                break true;
            }
            if k == t.len() || (!across && t[k] == '/') {
                break false;
            }
            k += 1;
        }
    } else if j < t.len() && (p[i] == '?' && t[j] != '/' || p[i] == t[j]) {
        match_at(p, t, i + 1, j + 1, memo)
    } else {
        false
    };
    memo[i][j] = Some(result);
    result
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_stay_within_a_part() {
        assert!(matches("ft/*/AHC/1", "ft/rid/AHC/1"));
        assert!(!matches("ft/*", "ft/rid/AHC/1"));
        assert!(matches("ft/**", "ft/rid/AHC/1"));
        assert!(matches("eval/rid/AHC/*", "eval/rid/AHC/3"));
        assert!(matches("eval/?id/*/1", "eval/rid/CHA/1"));
        assert!(!matches("eval/?id/*/1", "eval/rid/CHA/2"));
        assert!(matches("base", "base"));
        assert!(!matches("base", "based"));
        assert!(matches("**", "a/b/c"));
    }
}
