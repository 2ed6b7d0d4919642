//! Fleet identity: vehicle n of a fleet has a model, a plate prefix, a city and an ID that are
//! pure functions of n (DESIGN.md, "Fleet identity"), so a range moved to another host keeps
//! every vehicle exactly as it was.

use std::fmt::Write as _;

/// One vehicle model of the reference fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub name: &'static str,
    pub plate: &'static str,
    pub city: &'static str,
}

/// The ten models; vehicle n has model `MODELS[n % 10]`.
pub const MODELS: [Model; 10] = [
    Model {
        name: "SEAL",
        plate: "粤B",
        city: "深圳福田区",
    },
    Model {
        name: "QIN",
        plate: "陕A",
        city: "西安高新区",
    },
    Model {
        name: "HAN",
        plate: "陕A",
        city: "西安",
    },
    Model {
        name: "TANG",
        plate: "粤A",
        city: "广州天河区",
    },
    Model {
        name: "SONG",
        plate: "沪A",
        city: "上海浦东区",
    },
    Model {
        name: "YUAN",
        plate: "京A",
        city: "北京海淀区",
    },
    Model {
        name: "DOLPHIN",
        plate: "苏A",
        city: "南京",
    },
    Model {
        name: "SEAGULL",
        plate: "浙A",
        city: "杭州滨江区",
    },
    Model {
        name: "FRIGATE07",
        plate: "川A",
        city: "成都高新区",
    },
    Model {
        name: "DESTROYER05",
        plate: "渝A",
        city: "重庆渝中区",
    },
];

/// Serial numbers start here: vehicle 0 is `…·202400000`.
pub const SERIAL_BASE: u64 = 202_400_000;

/// The default ID template; `·` is U+00B7 MIDDLE DOT.
pub const DEFAULT_ID_TEMPLATE: &str = "{plate}·{model}·{serial}";

pub fn model_of(n: u64) -> &'static Model {
    &MODELS[(n % MODELS.len() as u64) as usize]
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}} in ID template (known: {{plate}} {{model}} {{city}} {{serial}} {{n}})")]
    Unknown(String),
    #[error("unclosed '{{' in ID template")]
    Unclosed,
    #[error(
        "ID template must contain {{serial}} or {{n}}, or every vehicle would get the same ID"
    )]
    NotUnique,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Plate,
    Model,
    City,
    Serial,
    N,
}

/// A parsed `--id-template`, rendered once per vehicle at start.
#[derive(Debug, Clone, PartialEq)]
pub struct IdTemplate {
    parts: Vec<Part>,
}

impl Default for IdTemplate {
    fn default() -> Self {
        // The default template is a constant known to parse.
        match IdTemplate::parse(DEFAULT_ID_TEMPLATE) {
            Ok(t) => t,
            Err(_) => unreachable!("default template parses"),
        }
    }
}

impl IdTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('{') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let j = after.find('}').ok_or(TemplateError::Unclosed)?;
            let part = match &after[..j] {
                "plate" => Part::Plate,
                "model" => Part::Model,
                "city" => Part::City,
                "serial" => Part::Serial,
                "n" => Part::N,
                other => return Err(TemplateError::Unknown(other.to_string())),
            };
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            parts.push(part);
            rest = &after[j + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if !parts.iter().any(|p| matches!(p, Part::Serial | Part::N)) {
            return Err(TemplateError::NotUnique);
        }
        Ok(IdTemplate { parts })
    }

    pub fn render(&self, n: u64) -> String {
        let m = model_of(n);
        let mut out = String::with_capacity(32);
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Plate => out.push_str(m.plate),
                Part::Model => out.push_str(m.name),
                Part::City => out.push_str(m.city),
                // Writing into a String cannot fail.
                Part::Serial => drop(write!(out, "{}", SERIAL_BASE + n)),
                Part::N => drop(write!(out, "{n}")),
            }
        }
        out
    }
}

/// The ID of vehicle n under the default template.
pub fn vehicle_id(n: u64) -> String {
    IdTemplate::default().render(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn reference_ids() {
        assert_eq!(vehicle_id(0), "粤B·SEAL·202400000");
        assert_eq!(vehicle_id(1), "陕A·QIN·202400001");
        assert_eq!(vehicle_id(19), "渝A·DESTROYER05·202400019");
        assert_eq!(model_of(12).name, "HAN");
        assert_eq!(model_of(12).city, "西安");
        assert!(vehicle_id(0).contains('\u{00B7}'));
    }

    #[test]
    fn ids_are_unique_and_deterministic() {
        let t = IdTemplate::default();
        let ids: HashSet<String> = (0..100_000).map(|n| t.render(n)).collect();
        assert_eq!(ids.len(), 100_000);
        assert_eq!(t.render(4242), vehicle_id(4242));
    }

    #[test]
    fn custom_templates() {
        let t = IdTemplate::parse("EV-{model}-{n}@{city}").unwrap();
        assert_eq!(t.render(3), "EV-TANG-3@广州天河区");
        assert_eq!(IdTemplate::parse("{model}"), Err(TemplateError::NotUnique));
        assert_eq!(
            IdTemplate::parse("{vin}-{n}"),
            Err(TemplateError::Unknown("vin".into()))
        );
        assert_eq!(IdTemplate::parse("{n"), Err(TemplateError::Unclosed));
    }
}
