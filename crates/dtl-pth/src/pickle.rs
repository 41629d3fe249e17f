//! A restricted pickle interpreter: the opcodes `torch.save` emits (protocols 2 to 5), a fixed
//! allow-list of globals, and no code execution. Callables are never called: the few allowed ones
//! are recognised by name and their effect (build an empty dict, describe a tensor view) is
//! reproduced here.

use std::collections::HashMap;
use std::rc::Rc;

use crate::DType;

/// Why the interpreter stopped.
#[derive(Debug)]
pub(crate) enum PickleError {
    /// A global outside the allow-list.
    Refused { module: String, name: String },
    /// Anything else, with the byte offset of the opcode.
    Malformed { offset: usize, message: String },
}

/// A tensor view as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Debug, Clone)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A persistent storage reference: `('storage', torch.<T>Storage, key, location, numel)`.
#[derive(Debug, Clone)]
pub(crate) struct StorageRef {
    pub dtype: DType,
    pub key: String,
    pub numel: u64,
}

/// The allowed globals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType(DType),
}

/// A value on the interpreter's stack. Lists and dicts live in a heap so that shared references
/// (memo) see later mutations, as in Python; everything else of unbounded size is reference
/// counted, so that fetching a memoised value costs O(1) whatever its size.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    // Values a checkpoint may hold beside its tensors; read, never interpreted.
    #[allow(dead_code)]
    Float(f64),
    Str(Rc<str>),
    #[allow(dead_code)]
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(usize),
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// Python-ish type name for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

#[derive(Debug)]
pub(crate) enum HeapObj {
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

/// The result of running a pickle: the root value and the heap its lists and dicts live in.
#[derive(Debug)]
pub(crate) struct Unpickled {
    pub root: Value,
    pub heap: Vec<HeapObj>,
}

impl Unpickled {
    /// The entries of a dict value, with Python's semantics for repeated keys (first position,
    /// last value). `None` when `v` is not a dict.
    pub fn dict_items(&self, v: &Value) -> Option<Vec<(Value, Value)>> {
        let Value::Dict(i) = v else { return None };
        let HeapObj::Dict(items) = &self.heap[*i] else {
            return None;
        };
        let mut out: Vec<(Value, Value)> = Vec::with_capacity(items.len());
        let mut pos: HashMap<Rc<str>, usize> = HashMap::new();
        for (k, val) in items {
            if let Value::Str(s) = k {
                if let Some(&p) = pos.get(s) {
                    out[p].1 = val.clone();
                    continue;
                }
                pos.insert(s.clone(), out.len());
            }
            out.push((k.clone(), val.clone()));
        }
        Some(out)
    }
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", storage) => Global::StorageType(match storage {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        }),
        _ => return None,
    };
    Some(g)
}

/// The globals the interpreter accepts, as `module.name`, for error messages and docs.
pub(crate) const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage",
];

/// PyTorch's limit on tensor dimensions.
const MAX_DIMS: usize = 64;

/// A global's module or name as shown in an error (a hostile one may be long).
fn clip(s: &str) -> String {
    if s.chars().count() <= 100 {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(100).collect::<String>())
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    heap: Vec<HeapObj>,
}

type R<T> = Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn err<T>(&self, message: impl Into<String>) -> R<T> {
        Err(PickleError::Malformed {
            offset: self.op_at,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return self.err(format!(
                "pickle truncated: needs {n} more bytes, {} left",
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len_u64(&mut self) -> R<usize> {
        let n = self.u64()?;
        usize::try_from(n).or_else(|_| self.err(format!("length {n} does not fit in memory")))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("pickle truncated: unterminated text argument");
        };
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| PickleError::Malformed {
                offset: self.op_at,
                message: "text argument is not UTF-8".into(),
            })?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn utf8(&self, b: &[u8]) -> R<String> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top_mut(&mut self) -> R<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.last_mut().expect("checked above"))
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, idx: u32) -> R<()> {
        let Some(v) = self.stack.last().cloned() else {
            return self.err("memo store with an empty stack");
        };
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> R<()> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.stack.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {idx} was never stored")),
        }
    }

    fn new_obj(&mut self, o: HeapObj) -> usize {
        self.heap.push(o);
        self.heap.len() - 1
    }

    fn dict_target(&mut self) -> R<usize> {
        match self.top_mut()? {
            Value::Dict(i) => Ok(*i),
            other => {
                let t = other.type_name();
                self.err(format!("SETITEM(S) on a {t}, not a dict"))
            }
        }
    }

    fn list_target(&mut self) -> R<usize> {
        match self.top_mut()? {
            Value::List(i) => Ok(*i),
            other => {
                let t = other.type_name();
                self.err(format!("APPEND(S) on a {t}, not a list"))
            }
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> R<()> {
        if items.len() % 2 != 0 {
            return self.err("SETITEMS with an odd number of items");
        }
        let d = self.dict_target()?;
        let HeapObj::Dict(dict) = &mut self.heap[d] else {
            return self.err("internal: dict index does not name a dict");
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> R<()> {
        let l = self.list_target()?;
        let HeapObj::List(list) = &mut self.heap[l] else {
            return self.err("internal: list index does not name a list");
        };
        list.extend(items);
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> R<Value> {
        match resolve_global(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => Err(PickleError::Refused {
                module: clip(module),
                name: clip(name),
            }),
        }
    }

    fn int(&self, v: &Value, what: &str) -> R<i64> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            other => self.err(format!("{what} is a {}, not an int", other.type_name())),
        }
    }

    fn dims(&self, v: &Value, what: &str) -> R<Vec<u64>> {
        let Value::Tuple(items) = v else {
            return self.err(format!("{what} is a {}, not a tuple", v.type_name()));
        };
        if items.len() > MAX_DIMS {
            return self.err(format!(
                "{what} has {} dimensions; PyTorch tensors have at most {MAX_DIMS}",
                items.len()
            ));
        }
        items
            .iter()
            .map(|x| {
                let i = self.int(x, what)?;
                u64::try_from(i)
                    .or_else(|_| self.err(format!("{what} holds the negative value {i}")))
            })
            .collect()
    }

    fn reduce(&mut self, f: Value, args: Value) -> R<Value> {
        let Value::Global(g) = f else {
            return self.err(format!(
                "REDUCE calls a {}, not an allowed global",
                f.type_name()
            ));
        };
        let Value::Tuple(args) = args else {
            return self.err(format!(
                "REDUCE arguments are a {}, not a tuple",
                args.type_name()
            ));
        };
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return self.err("collections.OrderedDict called with arguments");
                }
                Ok(Value::Dict(self.new_obj(HeapObj::Dict(Vec::new()))))
            }
            Global::RebuildTensorV2 => {
                if !(6..=7).contains(&args.len()) {
                    return self.err(format!(
                        "torch._utils._rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                        args.len()
                    ));
                }
                let Value::Storage(storage) = &args[0] else {
                    return self.err(format!(
                        "_rebuild_tensor_v2's first argument is a {}, not a storage",
                        args[0].type_name()
                    ));
                };
                let offset = self.int(&args[1], "storage offset")?;
                let offset = u64::try_from(offset)
                    .or_else(|_| self.err(format!("negative storage offset {offset}")))?;
                let shape = self.dims(&args[2], "tensor size")?;
                let stride = self.dims(&args[3], "tensor stride")?;
                if shape.len() != stride.len() {
                    return self.err(format!(
                        "tensor size has {} dimensions but its stride {}",
                        shape.len(),
                        stride.len()
                    ));
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset,
                    shape,
                    stride,
                })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let n = if g == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != n {
                    return self.err(format!(
                        "_rebuild_parameter takes {n} arguments, got {}",
                        args.len()
                    ));
                }
                match &args[0] {
                    Value::Tensor(t) => Ok(Value::Tensor(t.clone())),
                    other => self.err(format!(
                        "a Parameter of a {}, not of a tensor",
                        other.type_name()
                    )),
                }
            }
            Global::StorageType(_) => self.err("a storage type is called: not supported"),
        }
    }

    fn persistent(&self, pid: Value) -> R<Value> {
        let Value::Tuple(t) = &pid else {
            return self.err(format!(
                "persistent id is a {}, not a tuple",
                pid.type_name()
            ));
        };
        if t.len() != 5 || !matches!(&t[0], Value::Str(s) if &**s == "storage") {
            return self.err("persistent id is not ('storage', type, key, location, numel)");
        }
        let Value::Global(Global::StorageType(dtype)) = t[1] else {
            return self.err(format!(
                "persistent id names a {}, not a torch storage type",
                t[1].type_name()
            ));
        };
        let key = match &t[2] {
            Value::Str(s)
                if !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                s.to_string()
            }
            Value::Str(s) => {
                return self.err(format!("storage key {:?} is not a record name", clip(s)))
            }
            Value::Int(i) => i.to_string(),
            other => return self.err(format!("storage key is a {}", other.type_name())),
        };
        let numel = self.int(&t[4], "storage size")?;
        let numel =
            u64::try_from(numel).or_else(|_| self.err(format!("negative storage size {numel}")))?;
        Ok(Value::Storage(Rc::new(StorageRef { dtype, key, numel })))
    }

    fn run(&mut self) -> R<Value> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("pickle protocol {p} (at most 5 is known)"));
                    }
                }
                0x95 => {
                    // FRAME: the length is informational here
                    self.u64()?;
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.pop()?;
                    self.stack.push(v.clone());
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes does not fit in 64 bits"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.stack.push(Value::Str(s.into()));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.stack.push(Value::Str(s.into()));
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.stack.push(Value::Str(s.into()));
                }
                b'U' | b'T' => {
                    // SHORT_BINSTRING, BINSTRING (protocol 2 text from Python 2): latin-1
                    let n = if op == b'U' {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    self.stack.push(Value::Str(
                        b.iter().map(|&c| c as char).collect::<String>().into(),
                    ));
                }
                b'C' | b'B' | 0x8e => {
                    let n = match op {
                        b'C' => self.u8()? as usize,
                        b'B' => self.u32()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(b.into()));
                }
                b')' => self.stack.push(Value::Tuple(Rc::new([]))),
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(Rc::new([a])));
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(Rc::new([a, b])));
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(Rc::new([a, b, c])));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items.into()));
                }
                b']' => {
                    let i = self.new_obj(HeapObj::List(Vec::new()));
                    self.stack.push(Value::List(i));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let i = self.new_obj(HeapObj::List(items));
                    self.stack.push(Value::List(i));
                }
                b'}' => {
                    let i = self.new_obj(HeapObj::Dict(Vec::new()));
                    self.stack.push(Value::Dict(i));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let i = self.new_obj(HeapObj::Dict(Vec::new()));
                    self.stack.push(Value::Dict(i));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.err("STACK_GLOBAL needs two strings");
                    };
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: PyTorch sets a state dict's `_metadata` this way; the state is not
                    // needed to read tensors, so it is checked to be plain data and dropped.
                    let _state = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            let t = other.type_name();
                            return self
                                .err(format!("BUILD on a {t}: only dicts and tensors take state"));
                        }
                    }
                }
                other => {
                    return self.err(format!(
                        "unsupported pickle opcode 0x{other:02x}{}",
                        if other.is_ascii_graphic() {
                            format!(" ('{}')", other as char)
                        } else {
                            String::new()
                        }
                    ))
                }
            }
        }
    }
}

/// Runs a pickle to its STOP opcode.
pub(crate) fn unpickle(data: &[u8]) -> Result<Unpickled, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        heap: Vec::new(),
    };
    let root = m.run()?;
    Ok(Unpickled { root, heap: m.heap })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values() {
        // {'a': [1, -2, 300000, 2.5, 'x', None, True], 'b': (70000,)} at protocol 2
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'(',
        ];
        p.extend([b'K', 1, 0x8a, 1, 0xfe, b'J']);
        p.extend(300000i32.to_le_bytes());
        p.push(b'G');
        p.extend(2.5f64.to_be_bytes());
        p.extend([0x8c, 1, b'x', b'N', 0x88, b'e']);
        p.extend([b'X', 1, 0, 0, 0, b'b', b'M']);
        p.extend(4464u16.to_le_bytes());
        p.extend([0x85, b'u', b'.']);
        let u = unpickle(&p).unwrap();
        let items = u.dict_items(&u.root).unwrap();
        assert_eq!(items.len(), 2);
        let Value::List(l) = items[0].1 else { panic!() };
        let HeapObj::List(l) = &u.heap[l] else {
            panic!()
        };
        assert!(matches!(l[0], Value::Int(1)));
        assert!(matches!(l[1], Value::Int(-2)));
        assert!(matches!(l[2], Value::Int(300000)));
        assert!(matches!(l[3], Value::Float(f) if f == 2.5));
        assert!(matches!(&l[4], Value::Str(s) if &**s == "x"));
        assert!(matches!(l[5], Value::None));
        assert!(matches!(l[6], Value::Bool(true)));
        assert!(matches!(&items[1].1, Value::Tuple(t) if matches!(t[0], Value::Int(4464))));
    }

    #[test]
    fn refused_global_names_itself() {
        let p = b"\x80\x02cbuiltins\neval\nq\x00X\x01\x00\x00\x001\x85R.";
        match unpickle(p) {
            Err(PickleError::Refused { module, name }) => {
                assert_eq!((module.as_str(), name.as_str()), ("builtins", "eval"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn memo_shares_mutations() {
        // d = {}; memo[0] = d; d['k'] = None; return (d, memo[0]) -> both see 'k'
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00kNsh\x00\x86.";
        let u = unpickle(p).unwrap();
        let Value::Tuple(t) = &u.root else { panic!() };
        assert_eq!(u.dict_items(&t[1]).unwrap().len(), 1);
    }

    #[test]
    fn repeated_keys_keep_the_last_value_at_the_first_position() {
        let p =
            b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02X\x01\x00\x00\x00aK\x03u.";
        let u = unpickle(p).unwrap();
        let items = u.dict_items(&u.root).unwrap();
        assert_eq!(items.len(), 2);
        assert!(
            matches!((&items[0].0, &items[0].1), (Value::Str(k), Value::Int(3)) if &**k == "a")
        );
    }

    #[test]
    fn memo_fetches_do_not_copy() {
        // A 200,000-item tuple fetched 200,000 times: quadratic if each fetch copied it.
        let mut p = vec![0x80, 2, b'('];
        for _ in 0..200_000 {
            p.extend([b'K', 7]);
        }
        p.extend([b't', b'q', 0]);
        for _ in 0..200_000 {
            p.extend([b'h', 0]);
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        let u = unpickle(&p).unwrap();
        assert!(matches!(&u.root, Value::Tuple(t) if t.len() == 200_000));
        assert!(t.elapsed().as_secs_f64() < 5.0);
    }

    #[test]
    fn sizes_beyond_64_dimensions_are_refused() {
        let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00(".to_vec();
        p.extend([b'K', 1].repeat(65));
        p.extend(b"t(");
        p.extend([b'K', 1].repeat(65));
        p.extend(b"t\x89ccollections\nOrderedDict\n)RtR.");
        match unpickle(&p) {
            Err(PickleError::Malformed { message, .. }) => {
                assert!(message.contains("65 dimensions"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        for p in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x02s.",
            b"\x80\x02h\x05.",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02\xff.",
        ] {
            assert!(
                matches!(unpickle(p), Err(PickleError::Malformed { .. })),
                "{p:?}"
            );
        }
    }
}
