//! `[risk]`: how much risk each sensitivity level tolerates and what happens above it, and
//! where behaviour is watched at all (hours of the week count in the policy's `utc_offset`). Access
//! degrades by degree: a device at risk loses the most sensitive applications first.
//!
//! ```toml
//! [risk]
//! level3 = { max = "low", above = "deny" }     # high-sensitivity apps: only at low risk
//! level2 = { max = "medium", above = "log" }   # allowed above, with full detail recorded
//! monitor_from = 2                             # behaviour signals only for levels >= 2
//! aggregate_below = true                       # below it: records without destinations,
//!                                              # traffic summed per device and application
//!
//! [device_classes]
//! managed = 3    # the highest sensitivity level a class of device may use
//! personal = 2   # the default: personal devices stay below level 3
//! ```

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, Source};
use crate::risk::Level;

/// What kind of device: enrolled and looked after by the organisation, or a person's own. Set
/// at enrollment (the token's class) or by an MDM through the admin API; never by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    #[default]
    Managed,
    Personal,
}

impl DeviceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::Managed => "managed",
            DeviceClass::Personal => "personal",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceClass> {
        match s {
            "managed" => Some(DeviceClass::Managed),
            "personal" => Some(DeviceClass::Personal),
            _ => None,
        }
    }
}

/// `[device_classes]`: the highest sensitivity level each class of device may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassLevels {
    pub managed: u8,
    pub personal: u8,
}

impl Default for ClassLevels {
    fn default() -> Self {
        ClassLevels {
            managed: 3,
            personal: 2,
        }
    }
}

impl ClassLevels {
    pub fn highest(&self, class: DeviceClass) -> u8 {
        match class {
            DeviceClass::Managed => self.managed,
            DeviceClass::Personal => self.personal,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClasses {
    #[serde(default)]
    managed: Option<Spanned<u8>>,
    #[serde(default)]
    personal: Option<Spanned<u8>>,
}

pub(super) fn check_classes(
    src: &Source<'_>,
    raw: &RawClasses,
) -> Result<ClassLevels, ConfigError> {
    let mut out = ClassLevels::default();
    for (field, v, slot) in [
        ("device_classes.managed", &raw.managed, &mut out.managed),
        ("device_classes.personal", &raw.personal, &mut out.personal),
    ] {
        if let Some(v) = v {
            if !(0..=3).contains(v.get_ref()) {
                return Err(src.error(Some(v.span()), field, "a sensitivity level, 0 (none) to 3"));
            }
            *slot = *v.get_ref();
        }
    }
    Ok(out)
}

/// What a flow gets when the risk is above what its application's level tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Allowed as if the risk were tolerated.
    Allow,
    /// Allowed, with the full detail in its record.
    Log,
    /// Denied, with the risk as the reason.
    Deny,
}

/// One level's tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grade {
    /// The highest risk tolerated.
    pub max: Level,
    /// What happens above it.
    pub above: Response,
}

/// The checked `[risk]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskPolicy {
    pub grades: [Grade; 3],
    /// Behaviour signals are computed only for applications of this level and above.
    pub monitor_from: u8,
    /// Records of flows below `monitor_from` leave out destinations (address and ports), and
    /// their traffic is summed per device and application (one record a period).
    pub aggregate_below: bool,
}

impl Default for RiskPolicy {
    fn default() -> Self {
        let all = Grade {
            max: Level::High,
            above: Response::Allow,
        };
        RiskPolicy {
            grades: [all; 3],
            monitor_from: 2,
            aggregate_below: false,
        }
    }
}

impl RiskPolicy {
    /// What a flow to an application of `sensitivity` gets at `risk`: None when the risk is
    /// tolerated.
    pub fn response(&self, sensitivity: u8, risk: Level) -> Option<Response> {
        let g = self.grades[usize::from(sensitivity.clamp(1, 3) - 1)];
        (risk > g.max).then_some(g.above)
    }

    /// Whether behaviour is watched for flows to an application of `sensitivity`.
    pub fn monitored(&self, sensitivity: u8) -> bool {
        sensitivity >= self.monitor_from
    }

    /// Whether records of flows to an application of `sensitivity` are aggregated.
    pub fn aggregated(&self, sensitivity: u8) -> bool {
        self.aggregate_below && !self.monitored(sensitivity)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRisk {
    #[serde(default)]
    level1: Option<RawGrade>,
    #[serde(default)]
    level2: Option<RawGrade>,
    #[serde(default)]
    level3: Option<RawGrade>,
    #[serde(default)]
    monitor_from: Option<Spanned<u8>>,
    #[serde(default)]
    aggregate_below: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrade {
    max: Spanned<String>,
    above: Spanned<String>,
}

/// "+09:00", "-05:30", "Z" or "+00:00" as seconds east of UTC.
pub fn parse_offset(s: &str) -> Option<i64> {
    if s == "Z" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && m < 60).then_some(sign * (h * 3600 + m * 60))
}

pub(super) fn check(src: &Source<'_>, raw: &RawRisk) -> Result<RiskPolicy, ConfigError> {
    let mut out = RiskPolicy::default();
    for (i, g) in [&raw.level1, &raw.level2, &raw.level3]
        .into_iter()
        .enumerate()
    {
        let Some(g) = g else { continue };
        let field = |n: &str| format!("risk.level{}.{n}", i + 1);
        let max = Level::parse(g.max.get_ref())
            .ok_or_else(|| src.error(Some(g.max.span()), field("max"), "low, medium or high"))?;
        let above = match g.above.get_ref().as_str() {
            "allow" => Response::Allow,
            "log" => Response::Log,
            "deny" => Response::Deny,
            _ => {
                return Err(src.error(Some(g.above.span()), field("above"), "allow, log or deny"));
            }
        };
        out.grades[i] = Grade { max, above };
    }
    if let Some(m) = &raw.monitor_from {
        if !(1..=3).contains(m.get_ref()) {
            return Err(src.error(
                Some(m.span()),
                "risk.monitor_from",
                "a sensitivity level, 1 to 3",
            ));
        }
        out.monitor_from = *m.get_ref();
    }
    out.aggregate_below = raw.aggregate_below;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("+09:00"), Some(9 * 3600));
        assert_eq!(parse_offset("-05:30"), Some(-(5 * 3600 + 1800)));
        assert_eq!(parse_offset("Z"), Some(0));
        for bad in [
            "", "9", "+9:00", "+15:00", "+09:60", "09:00", "+0a:00", "+é",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grades_degrade_by_level() {
        let mut p = RiskPolicy::default();
        assert_eq!(
            p.response(3, Level::High),
            None,
            "nothing is graded by default"
        );
        p.grades[2] = Grade {
            max: Level::Low,
            above: Response::Deny,
        };
        p.grades[1] = Grade {
            max: Level::Medium,
            above: Response::Log,
        };
        assert_eq!(p.response(3, Level::Low), None);
        assert_eq!(p.response(3, Level::Medium), Some(Response::Deny));
        assert_eq!(p.response(2, Level::Medium), None);
        assert_eq!(p.response(2, Level::High), Some(Response::Log));
        assert_eq!(p.response(1, Level::High), None);
        assert!(p.monitored(2) && p.monitored(3) && !p.monitored(1));
    }
}
