//! Token usage as the upstream reports it, counted from the response stream for budgets.

/// Finds the token usage an upstream reports (`total_tokens`, or `input_tokens` +
/// `output_tokens`), in JSON or SSE, without parsing the body: the largest value seen of each.
#[derive(Default)]
pub struct UsageScan {
    total: u64,
    input: u64,
    output: u64,
    tail: Vec<u8>,
}

impl UsageScan {
    /// The next bytes of the response body.
    pub fn feed(&mut self, data: &[u8]) {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        for (key, slot) in [
            (&b"\"total_tokens\":"[..], 0),
            (b"\"input_tokens\":", 1),
            (b"\"output_tokens\":", 2),
        ] {
            for at in memchr::memmem::find_iter(&buf, key) {
                let digits = buf[at + key.len()..]
                    .iter()
                    .skip_while(|b| **b == b' ')
                    .take_while(|b| b.is_ascii_digit());
                let n = digits.fold(0u64, |n, d| {
                    n.saturating_mul(10).saturating_add((d - b'0') as u64)
                });
                let s = match slot {
                    0 => &mut self.total,
                    1 => &mut self.input,
                    _ => &mut self.output,
                };
                *s = (*s).max(n);
            }
        }
        let keep = buf.len().saturating_sub(32);
        self.tail = buf.split_off(keep);
    }

    /// The tokens reported so far, if any.
    pub fn total(&self) -> Option<u64> {
        let t = self.total.max(self.input + self.output);
        (t > 0).then_some(t)
    }
}

/// Counts a response's usage and charges it to a budget when the response ends.
pub struct Meter {
    scan: UsageScan,
    charge: Box<dyn FnOnce(u64) + Send + Sync>,
}

impl Meter {
    /// A meter that calls `charge` with the reported total, once, if usage was reported.
    pub fn new(charge: impl FnOnce(u64) + Send + Sync + 'static) -> Meter {
        Meter {
            scan: UsageScan::default(),
            charge: Box::new(charge),
        }
    }

    /// The next bytes of the response body.
    pub fn feed(&mut self, data: &[u8]) {
        self.scan.feed(data);
    }

    /// Charges what was reported; returns it for the audit record.
    pub fn settle(self) -> Option<u64> {
        let total = self.scan.total();
        if let Some(t) = total {
            (self.charge)(t);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_across_chunks_in_json_and_sse() {
        let mut s = UsageScan::default();
        s.feed(b"data: {\"usage\":{\"prompt_tokens\":5,\"total_to");
        s.feed(b"kens\": 42}}\n\n");
        assert_eq!(s.total(), Some(42));
        let mut a = UsageScan::default();
        a.feed(br#"event: message_start\ndata: {"usage":{"input_tokens":10,"output_tokens":1}}"#);
        a.feed(br#"event: message_delta\ndata: {"usage":{"output_tokens":15}}"#);
        assert_eq!(a.total(), Some(25));
    }
}
