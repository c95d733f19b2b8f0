//! Redaction of personal data from prompts and completions that a tenant
//! asked to keep (`log_prompts = true`): email addresses, payment card
//! numbers (Luhn-checked) and phone numbers.

use std::sync::LazyLock;

use regex::{Captures, Regex};

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}").expect("email pattern")
});

/// 13 to 19 digits, optionally grouped by single spaces or dashes.
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("card pattern"));

/// An optional `+` or `(`, then 7 to 15 digits separated by spaces, dots,
/// dashes or parentheses.
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:\+|\()?\d(?:[\s.()-]{0,2}\d){6,14}").expect("phone pattern"));

fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 { if d * 2 > 9 { d * 2 - 9 } else { d * 2 } } else { d }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The text with emails, card numbers and phone numbers replaced by
/// `[EMAIL]`, `[CARD]` and `[PHONE]`.
pub fn redact(text: &str) -> String {
    let text = EMAIL.replace_all(text, "[EMAIL]");
    let text = CARD.replace_all(&text, |c: &Captures| {
        let digits: Vec<u8> = c[0].bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
        if luhn_valid(&digits) { "[CARD]".to_string() } else { c[0].to_string() }
    });
    PHONE.replace_all(&text, "[PHONE]").into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_emails_cards_and_phones() {
        let s = redact(
            "Mail jane.doe+work@example.co.uk, card 4111 1111 1111 1111, call +1 (415) 555-2671 or 020 7946 0958.",
        );
        assert_eq!(s, "Mail [EMAIL], card [CARD], call [PHONE] or [PHONE].");
        assert_eq!(redact("4111-1111-1111-1111"), "[CARD]");
    }

    #[test]
    fn leaves_ordinary_text_and_numbers() {
        let s = "In 2026 we served 12345 requests at 3.5 ms each; version 1.2.3.";
        assert_eq!(redact(s), s);
        // Sixteen digits failing the Luhn check are not a card, but do look
        // like a long phone number, so they are still not kept.
        assert!(!redact("1234 5678 9012 3456").contains("9012"));
    }
}
