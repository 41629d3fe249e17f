//! Closed sets of pipeline values: each is an enum read from and written as its TOML string.
//!
//! A value outside the set is refused while the pipeline is parsed, with a one-line message
//! that names the value and lists every valid one; [`crate::config`] reports it under the key
//! and line it was found at.

/// Declares a closed set of string values as an enum with `FromStr`, `Display`, serde and
/// comparisons against `&str` (so `cfg.head.pool == "cls"` still reads naturally).
macro_rules! closed_set {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $what:literal, $hint:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in the order the documentation lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as written in a pipeline.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Every value as written in a pipeline.
            pub fn names() -> Vec<&'static str> {
                Self::ALL.iter().map(|v| v.as_str()).collect()
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(concat!("`{}` is not ", $what, "; use ", $hint), other)),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

closed_set! {
    /// `run.precision`: the number format of training.
    ///
    /// ```
    /// use dtl_core::choice::Precision;
    /// assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    /// assert_eq!(Precision::F32.to_string(), "f32");
    /// assert_eq!("f16".parse::<Precision>().unwrap_err(),
    ///            "`f16` is not a precision; use \"auto\", \"f32\" or \"bf16\"");
    /// assert_eq!(Precision::Auto.on_device(true), Precision::Bf16);
    /// assert_eq!(Precision::Auto.on_device(false), Precision::F32);
    /// ```
    pub enum Precision: "a precision", "\"auto\", \"f32\" or \"bf16\"" {
        /// bf16 on a CUDA device, f32 on the CPU (the default).
        Auto = "auto",
        /// 32-bit floats everywhere (TF32 off on a GPU).
        F32 = "f32",
        /// bfloat16 storage and matmuls (needs a CUDA device).
        Bf16 = "bf16",
    }
}

impl Precision {
    /// The precision a run uses on a CUDA device (`gpu`) or on the CPU: `auto` becomes bf16 on
    /// a GPU and f32 on the CPU; `f32` and `bf16` stay as they are.
    ///
    /// ```
    /// use dtl_core::choice::Precision;
    /// assert_eq!(Precision::F32.on_device(true), Precision::F32);
    /// assert_eq!(Precision::Bf16.on_device(false), Precision::Bf16);
    /// ```
    pub fn on_device(self, gpu: bool) -> Precision {
        match (self, gpu) {
            (Precision::Auto, true) => Precision::Bf16,
            (Precision::Auto, false) => Precision::F32,
            (p, _) => p,
        }
    }
}

closed_set! {
    /// `backbone.format`: the container of the weights file.
    ///
    /// ```
    /// use dtl_core::choice::WeightsFormat;
    /// assert_eq!("pth".parse::<WeightsFormat>().unwrap(), WeightsFormat::Pth);
    /// assert_eq!(WeightsFormat::Auto, "auto");
    /// assert!("onnx".parse::<WeightsFormat>().unwrap_err().contains("is not a weights format"));
    /// ```
    pub enum WeightsFormat: "a weights format", "\"auto\", \"safetensors\", \"npz\" or \"pth\"" {
        /// Told apart by the file's first bytes.
        Auto = "auto",
        /// A safetensors file (timm, Hugging Face).
        Safetensors = "safetensors",
        /// A NumPy `.npz` archive (Google/Flax ViT checkpoints).
        Npz = "npz",
        /// A PyTorch `torch.save` file (Microsoft's Swin releases).
        Pth = "pth",
    }
}

closed_set! {
    /// `head.pool`: which tokens the head reads.
    ///
    /// ```
    /// use dtl_core::choice::Pool;
    /// assert_eq!("cls".parse::<Pool>().unwrap(), Pool::Cls);
    /// assert!(Pool::Mean == "mean");
    /// ```
    pub enum Pool: "a pooling", "\"mean\" (patch tokens, the DTL head) or \"cls\" (class token)" {
        /// The mean of the patch tokens (the DTL head).
        Mean = "mean",
        /// The class token.
        Cls = "cls",
    }
}

closed_set! {
    /// `schedule.kind`: the shape of the learning-rate schedule.
    ///
    /// ```
    /// use dtl_core::choice::ScheduleKind;
    /// assert_eq!("constant".parse::<ScheduleKind>().unwrap(), ScheduleKind::Constant);
    /// assert_eq!("linear".parse::<ScheduleKind>().unwrap_err(),
    ///            "`linear` is not a schedule; use \"cosine\" or \"constant\"");
    /// ```
    pub enum ScheduleKind: "a schedule", "\"cosine\" or \"constant\"" {
        /// timm's `CosineLRScheduler` with warm-up and restarts.
        Cosine = "cosine",
        /// The peak learning rate throughout (after warm-up).
        Constant = "constant",
    }
}

closed_set! {
    /// `schedule.per`: how often the learning rate is updated.
    ///
    /// ```
    /// use dtl_core::choice::ScheduleUnit;
    /// assert_eq!("step".parse::<ScheduleUnit>().unwrap(), ScheduleUnit::Step);
    /// assert_eq!("batch".parse::<ScheduleUnit>().unwrap_err(),
    ///            "`batch` is not valid; use \"epoch\" or \"step\"");
    /// ```
    pub enum ScheduleUnit: "valid", "\"epoch\" or \"step\"" {
        /// Once per epoch (timm's default).
        Epoch = "epoch",
        /// Every optimizer step.
        Step = "step",
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{DeviceSpec, PipelineConfig};

    const BASE: &str =
        "[backbone]\nkind = \"toy\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n";

    fn parse_err(extra: &str, overrides: &[&str]) -> String {
        let text = format!("{extra}{BASE}");
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        PipelineConfig::from_str(&text, "p.toml".as_ref(), &overrides)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_value_outside_a_closed_set_is_one_line_naming_file_line_key_and_the_valid_ones() {
        let cases = [
            ("[run]\nprecision = \"f16\"\n", "p.toml:2: key `run.precision`: `f16` is not a precision; use \"auto\", \"f32\" or \"bf16\""),
            ("[run]\ndevice = \"gpu\"\n", "p.toml:2: key `run.device`: `gpu` is not a device; use \"cpu\", \"cuda:N\" (e.g. \"cuda:0\") or \"auto\""),
            ("[head]\npool = \"max\"\n", "p.toml:2: key `head.pool`: `max` is not a pooling; use \"mean\" (patch tokens, the DTL head) or \"cls\" (class token)"),
            ("[schedule]\nkind = \"step\"\n", "p.toml:2: key `schedule.kind`: `step` is not a schedule; use \"cosine\" or \"constant\""),
            ("[schedule]\nper = \"batch\"\n", "p.toml:2: key `schedule.per`: `batch` is not valid; use \"epoch\" or \"step\""),
        ];
        for (extra, want) in cases {
            assert_eq!(parse_err(extra, &[]), want);
        }
        let e = parse_err("", &["backbone.format=\"onnx\""]);
        assert!(
            e.starts_with(
                "p.toml (with overrides): key `backbone.format`: `onnx` is not a weights format"
            ),
            "{e}"
        );
        let e = parse_err("[run]\nprecision = 16\n", &[]);
        assert!(
            e.contains("key `run.precision`") && e.contains("expected a string"),
            "{e}"
        );
    }

    #[test]
    fn closed_sets_write_back_the_strings_they_were_read_from() {
        let text = format!(
            "[run]\ndevice = \"cuda:1\"\nprecision = \"bf16\"\n[head]\npool = \"cls\"\n\
             [schedule]\nkind = \"constant\"\nper = \"step\"\n{BASE}"
        );
        let text = text.replace("kind = \"toy\"\n", "kind = \"toy\"\nformat = \"pth\"\n");
        let cfg = PipelineConfig::from_str(&text, "p.toml".as_ref(), &[]).unwrap();
        assert_eq!(cfg.run.device, DeviceSpec::Cuda(1));
        let toml = cfg.to_toml();
        for line in [
            "device = \"cuda:1\"",
            "precision = \"bf16\"",
            "pool = \"cls\"",
            "kind = \"constant\"",
            "per = \"step\"",
            "format = \"pth\"",
        ] {
            assert!(toml.contains(line), "{line} missing from\n{toml}");
        }
        let again = PipelineConfig::from_str(&toml, "p.toml".as_ref(), &[]).unwrap();
        assert_eq!(again.to_toml(), toml);
    }
}
