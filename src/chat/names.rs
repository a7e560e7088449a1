//! Room and user name rules (SPEC section 3), shared by both dialects.

/// `#` followed by 1–49 characters, none of them space, comma, colon or a control character.
pub fn is_valid_room(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('#') else {
        return false;
    };
    let len = rest.chars().count();
    (1..=49).contains(&len)
        && rest
            .chars()
            .all(|c| c != ' ' && c != ',' && c != ':' && !c.is_control())
}

/// 1–30 characters of letters, digits and `_-[]\^{}|`, not starting with a digit or `-`.
pub fn is_valid_user(name: &str) -> bool {
    let len = name.chars().count();
    if !(1..=30).contains(&len) {
        return false;
    }
    let special = |c: char| "_-[]\\^{}|".contains(c);
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || (special(c) && c != '-'));
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || special(c))
}

/// Case-folded key for users and rooms: names compare case-insensitively.
pub fn fold(name: &str) -> String {
    name.to_lowercase()
}

/// Where a message goes: a room, or a user (a direct message).
pub fn is_room_target(target: &str) -> bool {
    target.starts_with('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert!(is_valid_room("#general"));
        assert!(is_valid_room("#a"));
        assert!(!is_valid_room("#"));
        assert!(!is_valid_room("general"));
        assert!(!is_valid_room("#a b"));
        assert!(!is_valid_room("#a,b"));
        assert!(!is_valid_room("#a:b"));
        assert!(!is_valid_room("#a\u{7}"));
        assert!(is_valid_room(&format!("#{}", "x".repeat(49))));
        assert!(!is_valid_room(&format!("#{}", "x".repeat(50))));
    }

    #[test]
    fn users() {
        assert!(is_valid_user("alice"));
        assert!(is_valid_user("[bot]_1"));
        assert!(is_valid_user("a-b"));
        assert!(!is_valid_user("1alice"));
        assert!(!is_valid_user("-alice"));
        assert!(!is_valid_user(""));
        assert!(!is_valid_user("a b"));
        assert!(!is_valid_user("#room"));
        assert!(!is_valid_user(&"a".repeat(31)));
        assert!(!is_valid_user("élodie"));
    }
}
